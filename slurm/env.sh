# shellcheck shell=bash
# Sourced by slurm/pretrain.sh and slurm/evaluate.sh after they cd to the submit directory
# (the repository root): the interpreter, the rendezvous and the communication environment
# every task of a gpt_dist job needs. `job_env NAME` sets PYTHON and exports the rest; it
# returns 2, with a message naming the script NAME, when the first host cannot be resolved.

job_env() {
    # The checkout's venv by default: a plain `sbatch` from a `make`-built checkout has no
    # venv on PATH, and python on PATH would not find gpt_dist.
    if [ -z "${PYTHON:-}" ]; then
        if [ -x .venv/bin/python ]; then PYTHON="$PWD/.venv/bin/python"; else PYTHON=python; fi
    fi

    # Rendezvous: the first node of the allocation; the port is derived from the job id so
    # two jobs sharing a node do not collide, and a requeued job (same id) reuses it.
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    if [ -z "$MASTER_ADDR" ]; then
        echo "$1: cannot resolve the first host of $SLURM_JOB_NODELIST" >&2
        return 2
    fi
    MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"
    export MASTER_ADDR MASTER_PORT

    # torch: do not share the rendezvous TCPStore between c10d and the elastic agent.
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

    # NCCL / CUDA (override in the submitting environment):
    #   NCCL_DEBUG=WARN|INFO         INFO prints the transport chosen (IB/RoCE vs sockets)
    #   NCCL_SOCKET_IFNAME=ib0|eth0  the interface for bootstrap/socket traffic ("^lo,docker")
    #   NCCL_IB_HCA=mlx5             restrict to these InfiniBand adapters
    #   NCCL_IB_DISABLE=1            force TCP sockets (slow; debugging only)
    #   NCCL_NET_GDR_LEVEL=PHB       GPUDirect RDMA distance
    #   TORCH_NCCL_ASYNC_ERROR_HANDLING=1  abort collectives on a failed peer instead of hanging
    #   TORCH_NCCL_BLOCKING_WAIT=0   (keep async error handling)
    #   CUDA_DEVICE_MAX_CONNECTIONS=1  megatron-core's TP/SP comm-compute overlap ordering
    #   OMP_NUM_THREADS              CPU threads per rank (data loading, CPU Adam)
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-4}}"
}
