#!/bin/bash
# gpt_dist zero-shot evaluation under Slurm: one task per GPU, launched with srun; the
# arguments are launch/evaluate.py's.
#
#   mkdir -p logs
#   sbatch slurm/evaluate.sh --model runs/xl-a --tp 4 --pp 2 --tasks lambada,wikitext,hellaswag \
#          --data-dir evals/ --out results/xl-a.json
#   sbatch --nodes=1 slurm/evaluate.sh --model runs/xl-a --all-checkpoints --tasks lambada ...
#
# The world is --tp x --pp x (data-parallel replicas, which split the examples): ask for as
# many tasks. Submit from the repository root; PYTHON as in slurm/pretrain.sh (default: the
# checkout's .venv/bin/python, else python on PATH). Evaluation writes nothing until its
# results, so a job that ends early is simply run again: no requeue.
#
#SBATCH --job-name=gpt_dist_eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#
# Each task picks cuda:$SLURM_LOCALID (gpt_dist.parallel maps SLURM_PROCID/SLURM_NTASKS/
# SLURM_LOCALID to RANK/WORLD_SIZE/LOCAL_RANK when MASTER_ADDR is set).

set -uo pipefail

if [ "$#" -lt 1 ]; then
    echo "usage: sbatch slurm/evaluate.sh --model PATH --tasks T[,T..] [launch/evaluate.py options]" >&2
    exit 2
fi
: "${SLURM_JOB_ID:?not inside a Slurm job (use sbatch)}"
: "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}"
cd "${SLURM_SUBMIT_DIR:-.}" || exit 2

# PYTHON, the rendezvous and the NCCL/OMP environment, as for pretraining (slurm/env.sh).
# shellcheck source=/dev/null
if ! . slurm/env.sh 2>/dev/null; then
    echo "evaluate.sh: no slurm/env.sh in $PWD: submit from the repository root" >&2
    exit 2
fi
job_env evaluate.sh || exit 2

echo "evaluate.sh: job $SLURM_JOB_ID nodes=${SLURM_NNODES:-?} tasks=${SLURM_NTASKS:-?}" \
     "master=$MASTER_ADDR:$MASTER_PORT"
srun --kill-on-bad-exit=1 "$PYTHON" launch/evaluate.py "$@"
rc=$?
echo "evaluate.sh: srun exited with $rc"
exit "$rc"
