#!/usr/bin/env bash
# The GPU check (issue 14), one command on a bare GPU machine, under 10 minutes on one H100/H200:
#
#   bench/gpu_check.sh --prepare   here, with network: wheels for what the GPU image lacks -> .whl/
#   bench/gpu_check.sh             on the GPU machine (carry .whl and data/sample): install the
#                                  wheels, run tests/kernels on CUDA (compiled Triton, not the
#                                  interpreter), a short bf16 pretraining of gpt2_124m through
#                                  launch/pretrain.py (NCCL, one GPU, loss must fall), the same
#                                  run resumed at ZeRO-3 (issue 19: a new layout), and
#                                  bench/mfu_bench.py; results under $OUT
#   bench/gpu_check.sh --cpu       the same steps on a CPU with tiny sizes (a dry run of the script)
#
# The GPU image is assumed to have Python 3.12 with torch, Triton, nvcc, transformers, pytest and
# sentencepiece, but not deepspeed or megatron-core (nor their pydantic/hjson): those travel as
# wheels built or downloaded by --prepare (DeepSpeed is an sdist on PyPI: built here into a
# pure-Python wheel; its FusedAdam op is JIT-built on the GPU for sm_90 only).
#
# $OUT gets at most 9 files: env.txt, kernels.log, pretrain.log, reshard.log, mfu.json, mfu.md,
# summary.json, summary.md. Each step has its own time limit; a step that fails or times out is recorded and the
# next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
MODE=gpu
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --cpu) MODE=cpu ;;
  "") ;;
  *) echo "usage: bench/gpu_check.sh [--prepare | --cpu]" >&2; exit 2 ;;
esac
WHEELS=${WHEELS:-$REPO/.whl}
DATA=${DATA:-$REPO/data/sample}

if [ "$MODE" = prepare ]; then
  PIP=${PIP:-$REPO/.venv/bin/python -m pip}
  mkdir -p "$WHEELS"
  ver() { $REPO/.venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
  set -e
  # DeepSpeed: sdist only on PyPI; a wheel of its Python sources (ops are JIT-built where they run)
  DS_BUILD_OPS=0 $PIP wheel -q --no-deps --no-build-isolation -w "$WHEELS" "deepspeed==$(ver deepspeed)"
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" \
    "megatron-core==$(ver megatron-core)" "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic_core)" \
    "annotated-types==$(ver annotated-types)" "typing-inspection==$(ver typing-inspection)" \
    "typing-extensions==$(ver typing_extensions)" "hjson==$(ver hjson)"
  ls -la "$WHEELS"
  echo "carry: .whl and data/sample (make demo builds it); run: bash bench/gpu_check.sh"
  exit 0
fi

OUT=${OUT:-$REPO/runs/gpu_check}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.json
echo "{}" > "$SUMMARY"
T0=$(date +%s)

if [ "$MODE" = gpu ]; then
  PY=${PYTHON:-python3}
  SITE=${SITE:-/tmp/gpu_check_site}
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
      || { echo "wheel install failed" >&2; exit 3; }
    export PYTHONPATH=$SITE:$REPO
  else
    export PYTHONPATH=$REPO
  fi
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # FusedAdam's JIT build: Hopper only
  unset TRITON_INTERPRET
  LIMIT_TESTS=200 LIMIT_PRETRAIN=150 LIMIT_BENCH=260
else
  PY=${PYTHON:-$REPO/.venv/bin/python}
  export PYTHONPATH=$REPO DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} CUDA_VISIBLE_DEVICES=
  LIMIT_TESTS=400 LIMIT_PRETRAIN=300 LIMIT_BENCH=400
fi
export PYTHONUNBUFFERED=1

record() {  # record NAME RC SECONDS [extra json object]
  $PY - "$SUMMARY" "$1" "$2" "$3" "${4:-{\}}" <<'PYEOF'
import json, sys
path, name, rc, sec, extra = sys.argv[1:6]
data = json.load(open(path))
data[name] = {"rc": int(rc), "seconds": int(sec), "ok": int(rc) == 0, **json.loads(extra)}
json.dump(data, open(path, "w"), indent=1)
PYEOF
}

run_step() {  # run_step NAME LIMIT_S LOGFILE CMD...
  local name=$1 limit=$2 log=$3; shift 3
  local t=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "== $name rc=$rc after $(( $(date +%s) - t ))s" | tee -a "$log"
  STEP_RC=$rc STEP_SEC=$(( $(date +%s) - t ))
}

# ---- 0. what machine this is
{
  date; uname -a
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1
  $PY -c "import deepspeed, megatron.core; print('deepspeed', deepspeed.__version__, 'megatron-core', megatron.core.__version__)" 2>&1 | tail -1
  command -v nvcc >/dev/null && nvcc --version | tail -2
} > "$OUT/env.txt" 2>&1

# ---- 1. the kernel tests on the device (CUDA: compiled Triton; CPU: the interpreter)
run_step kernels "$LIMIT_TESTS" "$OUT/kernels.log" \
  $PY -m pytest -q -p no:cacheprovider -m "not slow" tests/kernels -rs
tests_line=$(grep -E "^[0-9]+ (passed|failed)|passed|failed" "$OUT/kernels.log" | tail -1)
record kernels "$STEP_RC" "$STEP_SEC" "{\"result\": $(printf '%s' "$tests_line" | $PY -c 'import json,sys; print(json.dumps(sys.stdin.read().strip()))')}"

# ---- 2. a short pretraining of gpt2_124m through launch/pretrain.py (NCCL on one GPU)
RUN=${RUN_DIR:-/tmp/gpu_check_pretrain}
rm -rf "$RUN"
SET=(data.prefixes="['$DATA/webtext']" data.tokenizer="$DATA/tokenizer" run.dir="$RUN"
     training.eval_interval=1000 training.eval_steps=1 checkpoint.save_interval=100000
     logging.log_interval=10 logging.tensorboard=false logging.progress_bar=false
     schedule.warmup_steps=10 schedule.decay=constant optimizer.lr=6e-4
     deepspeed.zero_optimization.stage=1)
if [ "$MODE" = gpu ]; then
  SET+=(training.train_steps=60 training.micro_batch_size=16 training.global_batch_size=16
        training.precision=bf16 training.device=cuda)
else
  SET+=(training.train_steps=20 training.micro_batch_size=2 training.global_batch_size=2 training.precision=fp32
        training.device=cpu data.seq_len=64 model.n_ctx=64 model.n_layer=2 model.n_embd=64 model.n_head=4
        model.dropout=0.0 model.attn_dropout=0.0 optimizer.lr=3e-3)
fi
run_step pretrain "$LIMIT_PRETRAIN" "$OUT/pretrain.log" \
  $PY -m torch.distributed.run --standalone --nproc-per-node=1 launch/pretrain.py \
  --config configs/gpt2_124m.json --set "${SET[@]}"
falling=$($PY - "$RUN" <<'PYEOF'
import json, sys
from pathlib import Path
path = Path(sys.argv[1]) / "metrics.jsonl"
recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
loss = [r["loss"] for r in recs if "loss" in r]
k = max(1, len(loss) // 5)
first, last = (sum(loss[:k]) / k, sum(loss[-k:]) / k) if loss else (None, None)
print(json.dumps({"steps": len(loss), "loss_first": first, "loss_last": last,
                  "loss_falls": bool(loss) and last < first - 0.5}))
PYEOF
)
record pretrain "$STEP_RC" "$STEP_SEC" "$falling"

# ---- 2b. the same run resumed in another layout (issue 19): ZeRO-1 -> ZeRO-3, 10 more steps;
#          the layout-free state (safe_get/set_full_* on CUDA) must carry the run on
if [ "$MODE" = gpu ]; then MORE=70; else MORE=30; fi
run_step reshard "$LIMIT_PRETRAIN" "$OUT/reshard.log" \
  $PY -m torch.distributed.run --standalone --nproc-per-node=1 launch/pretrain.py \
  --config configs/gpt2_124m.json --set "${SET[@]}" deepspeed.zero_optimization.stage=3 training.train_steps=$MORE
carried=$($PY - "$RUN" "$OUT/reshard.log" <<'PYEOF'
import json, sys
from pathlib import Path
path, log = Path(sys.argv[1]) / "metrics.jsonl", Path(sys.argv[2])
recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
loss = [r["loss"] for r in sorted((r for r in recs if "loss" in r), key=lambda r: r["step"])]
before, after = loss[-15:-10], loss[-10:-5]  # the 5 steps before the resume, the 5 after it
jump = sum(after) / 5 - sum(before) / 5 if len(loss) >= 15 else None
print(json.dumps({"resharded": log.exists() and "resume in a new layout" in log.read_text(),
                  "steps": len(loss), "loss_jump_after_resume": jump,
                  "continues": jump is not None and jump < 0.3}))
PYEOF
)
record reshard "$STEP_RC" "$STEP_SEC" "$carried"

# ---- 3. MFU: gpt2_124m/355m/1.5b, kernels on vs off vs Hugging Face (and torch.compile on 124m)
if [ "$MODE" = gpu ]; then
  BENCH=(--models gpt2_124m,gpt2_355m,gpt2_1.5b --compile --compile-models gpt2_124m --steps 8 --warmup 3)
else
  BENCH=(--tiny --device cpu --models gpt2_124m,gpt2_1.5b --compile --compile-models gpt2_124m)
fi
run_step mfu "$LIMIT_BENCH" "$OUT/mfu_bench.log" $PY bench/mfu_bench.py --out "$OUT" --no-append "${BENCH[@]}"
record mfu "$STEP_RC" "$STEP_SEC"
tail -c 20000 "$OUT/mfu_bench.log" > "$OUT/mfu_bench.tail" && mv "$OUT/mfu_bench.tail" "$OUT/mfu_bench.log"

# ---- summary
$PY - "$SUMMARY" "$OUT" "$MODE" "$(( $(date +%s) - T0 ))" <<'PYEOF'
import json, sys
from pathlib import Path
summary, out, mode, total = json.load(open(sys.argv[1])), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
summary["total_seconds"], summary["mode"] = total, mode
json.dump(summary, open(sys.argv[1], "w"), indent=1)
lines = [f"# GPU check ({mode}), {total} s", ""]
for name in ("kernels", "pretrain", "reshard", "mfu"):
    s = summary.get(name, {})
    extra = {k: v for k, v in s.items() if k not in ("rc", "seconds", "ok")}
    lines.append(f"- {name}: {'ok' if s.get('ok') else 'FAILED'} (rc {s.get('rc')}, {s.get('seconds')} s) {extra or ''}")
mfu = out / "mfu.md"
lines += ["", mfu.read_text() if mfu.exists() else "(no MFU table)"]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
ok=$($PY -c "import json,sys; d=json.load(open('$SUMMARY')); print(int(all(d[k]['ok'] for k in ('kernels','pretrain','reshard','mfu')) and d['pretrain'].get('loss_falls', False) and d['reshard'].get('resharded', False) and d['reshard'].get('continues', False)))")
[ "$ok" = 1 ]
