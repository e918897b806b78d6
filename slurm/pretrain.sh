#!/bin/bash
# gpt_dist pretraining under Slurm: one task per GPU, launched with srun.
#
#   mkdir -p logs                       # Slurm does not create the --output directory
#   sbatch slurm/pretrain.sh configs/gpt2_1.5b.json
#   sbatch --nodes=4 --time=48:00:00 slurm/pretrain.sh configs/gpt2_1.5b.json \
#          --set training.train_steps=20000
#   RUN_NAME=xl-a sbatch slurm/pretrain.sh configs/gpt2_1.5b.json   # resume run "xl-a"
#
# Every #SBATCH default below is overridable on the sbatch command line. Submit from the
# repository root (the job cd's to $SLURM_SUBMIT_DIR): the job runs the checkout's
# .venv/bin/python (what `make` creates) unless PYTHON says otherwise; sbatch exports the
# submitting environment, so an active virtual environment needs PYTHON=python.
#
# Preemption / time limit: Slurm sends SIGUSR1 to this batch shell 120 s before the end
# (--signal=B:USR1@120). The trap forwards it to the srun step; every rank agrees (an
# all-reduced flag), saves a checkpoint at the same step and exits 0; then this script
# requeues the job (same job id, so the same run name and port), and the requeued job
# resumes from the newest committed checkpoint (checkpoint.load=auto). A job that fails
# for any other reason (non-zero exit, no signal) is NOT requeued. Requeues are capped by
# MAX_RESTARTS (compared with SLURM_RESTART_COUNT). scancel sends SIGTERM: the trainer
# saves and exits, and the job is not requeued.
#
# Environment knobs (all optional):
#   RUN_NAME      run name (default: <job name>-<job id>); the run dir follows the config's
#                 run.dir (default runs/${name}); set RUN_NAME to continue an older run
#   RUN_DIR       override run.dir
#   PYTHON        interpreter (default: the checkout's .venv/bin/python if there is one,
#                 else python on PATH)
#   ENTRY         the entry script (default launch/pretrain.py); fine-tuning runs the same way:
#                 ENTRY=launch/finetune.py sbatch slurm/pretrain.sh configs/finetune_gpt1_paper.json
#   MAX_RESTARTS  most automatic requeues (default 10)
#   SRUN_ARGS     extra srun arguments, whitespace-separated (e.g. "--cpu-bind=cores")
#
#SBATCH --job-name=gpt_dist
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#
# Each task sees all GPUs of its node and picks cuda:$SLURM_LOCALID (gpt_dist.parallel maps
# SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID to RANK/WORLD_SIZE/LOCAL_RANK when MASTER_ADDR
# is set); do not add --gpus-per-task / --gpu-bind=single, which would hide the others.

set -uo pipefail   # no -e: the exit status of srun is inspected below

if [ "$#" -lt 1 ]; then
    echo "usage: sbatch slurm/pretrain.sh CONFIG [--set section.key=value ...]" >&2
    exit 2
fi
CONFIG="$1"
shift

: "${SLURM_JOB_ID:?not inside a Slurm job (use sbatch)}"
: "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}"
cd "${SLURM_SUBMIT_DIR:-.}" || exit 2

# PYTHON, the rendezvous (MASTER_ADDR/MASTER_PORT) and the NCCL/CUDA/OMP environment: one
# definition for every job script (slurm/env.sh, which lists the NCCL knobs).
# shellcheck source=/dev/null
if ! . slurm/env.sh 2>/dev/null; then
    echo "pretrain.sh: no slurm/env.sh in $PWD: submit from the repository root" >&2
    exit 2
fi
job_env pretrain.sh || exit 2
MAX_RESTARTS="${MAX_RESTARTS:-10}"
RESTART_COUNT="${SLURM_RESTART_COUNT:-0}"
RUN_NAME="${RUN_NAME:-${SLURM_JOB_NAME:-gpt_dist}-${SLURM_JOB_ID}}"

SET_ARGS=("run.name=$RUN_NAME")
if [ -n "${RUN_DIR:-}" ]; then
    SET_ARGS+=("run.dir=$RUN_DIR")
fi
EXTRA_SRUN=()
if [ -n "${SRUN_ARGS:-}" ]; then
    read -r -a EXTRA_SRUN <<< "$SRUN_ARGS"
fi

echo "pretrain.sh: job $SLURM_JOB_ID restart $RESTART_COUNT/$MAX_RESTARTS" \
     "nodes=${SLURM_NNODES:-?} tasks=${SLURM_NTASKS:-?} master=$MASTER_ADDR:$MASTER_PORT" \
     "run=$RUN_NAME config=$CONFIG"

GOT_USR1=0
GOT_TERM=0
srun_pid=""
forward() {  # forward() SIGNAL: pass a signal from Slurm on to every task of the step
    if [ -n "$srun_pid" ]; then
        kill -s "$1" "$srun_pid" 2>/dev/null || true
    fi
}
# shellcheck disable=SC2317  # trap handlers, invoked indirectly
on_usr1() { GOT_USR1=1; echo "pretrain.sh: SIGUSR1 (time limit/preemption): checkpoint and requeue"; forward USR1; }
# shellcheck disable=SC2317
on_term() { GOT_TERM=1; echo "pretrain.sh: SIGTERM: checkpoint and stop"; forward TERM; }
trap on_usr1 USR1
trap on_term TERM

srun --kill-on-bad-exit=1 "${EXTRA_SRUN[@]}" \
    "$PYTHON" "${ENTRY:-launch/pretrain.py}" --config "$CONFIG" --set "${SET_ARGS[@]}" "$@" &
srun_pid=$!
if [ "$GOT_USR1" = 1 ]; then forward USR1; fi   # a signal that came before srun started
if [ "$GOT_TERM" = 1 ]; then forward TERM; fi

# A trapped signal interrupts `wait` (status > 128) while srun still runs: wait again until
# srun itself has exited and been reaped.
while :; do
    wait "$srun_pid"
    rc=$?
    if kill -0 "$srun_pid" 2>/dev/null; then
        continue
    fi
    break
done
srun_pid=""   # reaped: a late signal must not reach a process that reuses its pid
echo "pretrain.sh: srun exited with $rc"

if [ "$GOT_USR1" = 1 ] && [ "$GOT_TERM" = 0 ] && [ "$rc" = 0 ]; then
    if [ "$RESTART_COUNT" -lt "$MAX_RESTARTS" ]; then
        echo "pretrain.sh: requeueing job $SLURM_JOB_ID (restart $((RESTART_COUNT + 1)) of $MAX_RESTARTS)"
        # The requeue ends this job instance: Slurm may SIGTERM this shell before it exits.
        # Nothing is left to checkpoint, so that TERM is not the "scancel" of on_term.
        trap '' TERM
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    echo "pretrain.sh: MAX_RESTARTS=$MAX_RESTARTS reached; not requeueing" >&2
fi
exit "$rc"
