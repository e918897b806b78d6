#!/bin/bash
# gpt_dist preprocessing as a chain of Slurm jobs: job arrays for the per-task stages, each
# stage started only when every task of the previous one succeeded (--dependency=afterok).
#
#   slurm/preprocess.sh --tasks 64 --work-dir /shared/work/owt2 -- \
#       --input '/shared/corpus/*.jsonl' --tokenizer tokenizers/gpt2 \
#       --output-prefix /shared/data/owt2
#
# Run it on the login node (it calls sbatch; it is not itself submitted). It submits
#
#   plan (1 job) -> keys (array 0..N-1) -> bands (array 0..N-1) -> components (1 job)
#        -> tokenize (array 0..N-1) -> finalize (1 job)
#
# and prints the job ids. Each job runs `data_tools/preprocess.py --stage STAGE` (the task
# id comes from SLURM_ARRAY_TASK_ID) and logs to WORK/logs/STAGE_TASK.out. The work
# directory and the output prefix must be on a file system every node sees.
#
# A failed task stops the chain: its log ends with one line naming the input, task or file;
# the later stages' jobs are cancelled (--kill-on-invalid-dep=yes), and a last job (`--stage
# status`, only when finalize did not succeed) writes WORK/logs/status_0.out: tasks complete
# per stage and each failed task's log with its last line. Rerun: fix the cause and
# run the same command again; every task that completed has a marker (WORK/STAGE/K.done)
# and is skipped, the others start over. Options after `--` are used by the plan stage only
# (the plan is written once: another command needs another --work-dir).
#
# Environment knobs (all optional):
#   PYTHON           interpreter (default: the checkout's .venv/bin/python if there is one,
#                    else python on PATH)
#   SBATCH_ARGS      extra sbatch arguments for every job, whitespace-separated
#                    (e.g. "--partition=cpu --time=4:00:00")
#   CPUS_PER_TASK    CPUs per task (default 4); also the worker processes of each task
#   MEM_PER_TASK     memory per task, e.g. 8G (default: the partition's; see docs/data.md)
#
# Inside a job (STAGED_PREPROCESS_STAGE is set by this script) it runs the stage instead.

set -uo pipefail

# the repository root: where this script lies when run by hand; where it was submitted from
# inside a job (Slurm runs a copy of the script from its spool directory)
if [ -n "${STAGED_PREPROCESS_STAGE:-}" ]; then cd "${SLURM_SUBMIT_DIR:-.}" || exit 2
else cd "$(dirname "$0")/.." || exit 2; fi
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON="$PWD/.venv/bin/python"; else PYTHON=python; fi
fi

if [ -n "${STAGED_PREPROCESS_STAGE:-}" ]; then  # a job of the chain
    exec "$PYTHON" data_tools/preprocess.py --stage "$STAGED_PREPROCESS_STAGE" \
        --work-dir "$STAGED_PREPROCESS_WORK" "$@"
fi

usage() {
    echo "usage: slurm/preprocess.sh --tasks N --work-dir DIR -- PREPROCESS_OPTIONS..." >&2
    exit 2
}
TASKS=""
WORK=""
while [ "$#" -gt 0 ]; do
    case "$1" in
        --tasks) TASKS="${2:-}"; shift 2 || usage ;;
        --work-dir) WORK="${2:-}"; shift 2 || usage ;;
        --) shift; break ;;
        *) usage ;;
    esac
done
case "$TASKS" in ''|*[!0-9]*|0) echo "preprocess.sh: --tasks must be a positive integer" >&2; exit 2 ;; esac
[ -n "$WORK" ] || usage
mkdir -p "$WORK/logs" || exit 2
WORK="$(cd "$WORK" && pwd)"
LAST=$((TASKS - 1))
CPUS="${CPUS_PER_TASK:-4}"
read -r -a EXTRA <<< "${SBATCH_ARGS:-}"

# submit STAGE ARRAY DEPENDENCY [ARGS...]: prints the job id
submit() {
    local stage="$1" array="$2" dep="$3"
    shift 3
    local args=(--parsable --job-name="preprocess-$stage" --nodes=1 --ntasks=1
                --cpus-per-task="$CPUS" --kill-on-invalid-dep=yes
                --export="ALL,PYTHON=$PYTHON,STAGED_PREPROCESS_STAGE=$stage,STAGED_PREPROCESS_WORK=$WORK")
    if [ -n "${MEM_PER_TASK:-}" ]; then
        args+=(--mem="$MEM_PER_TASK")
    fi
    if [ -n "$array" ]; then
        args+=(--array="$array" --output="$WORK/logs/${stage}_%a.out")
    else
        args+=(--output="$WORK/logs/${stage}_0.out")
    fi
    if [ -n "$dep" ]; then
        args+=(--dependency="$dep")
    fi
    local out
    if ! out="$(sbatch "${args[@]}" "${EXTRA[@]}" slurm/preprocess.sh "$@")"; then
        echo "preprocess.sh: sbatch of the $stage stage failed" >&2
        exit 1
    fi
    echo "${out%%;*}"
}

PLAN=$(submit plan "" "" --tasks "$TASKS" --workers "$CPUS" --no-progress "$@") || exit 1
KEYS=$(submit keys "0-$LAST" "afterok:$PLAN") || exit 1
BANDS=$(submit bands "0-$LAST" "afterok:$KEYS") || exit 1
COMPONENTS=$(submit components "" "afterok:$BANDS") || exit 1
TOKENIZE=$(submit tokenize "0-$LAST" "afterok:$COMPONENTS") || exit 1
FINALIZE=$(submit finalize "" "afterok:$TOKENIZE") || exit 1
# runs only if the chain stopped (finalize failed or was cancelled): names the failed tasks' logs
REPORT=$(submit status "" "afternotok:$FINALIZE") || exit 1
echo "plan $PLAN keys $KEYS bands $BANDS components $COMPONENTS tokenize $TOKENIZE finalize $FINALIZE report $REPORT"
echo "logs: $WORK/logs/STAGE_TASK.out; if the chain stops: $WORK/logs/status_0.out"
