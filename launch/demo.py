#!/usr/bin/env python
"""`make demo`: the whole workflow end to end on the embedded sample corpus, on CPU.

1. data:      sample corpus (text already on this machine) -> sentencepiece BPE -> shards
2. pretrain:  the tiny GPT-2 on 2 ranks under the DeepSpeed launcher (gloo on CPU)
3. export:    consolidated safetensors + Hugging Face directory, and a few generations

Each stage is skipped when its output is already there, so re-running is cheap.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
DATA = ROOT / "data" / "sample"
CONFIG = ROOT / "configs" / "tiny_cpu.json"


def run(cmd: list[str], **env: str) -> None:
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, **env})
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def stage_data() -> None:
    corpus = DATA / "corpus.jsonl"
    if not corpus.exists():
        run([PY, "data_tools/sample_corpus.py", "--out", str(corpus)])
    if not (DATA / "tokenizer").exists():
        run([PY, "data_tools/train_tokenizer.py", "--input", str(corpus), "--vocab-size", "2048",
             "--out", str(DATA / "tokenizer")])
    if not list(DATA.glob("webtext_*.idx")):
        run([PY, "data_tools/preprocess.py", "--input", str(corpus), "--tokenizer",
             str(DATA / "tokenizer"), "--output-prefix", str(DATA / "webtext"), "--workers", "2"])
    run([PY, "data_tools/inspect_shards.py", str(DATA / "webtext"), "--num-docs", "1"])


def stage_pretrain() -> None:
    env = {"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "DS_ACCELERATOR": "cpu"}
    deepspeed = shutil.which("deepspeed") or str(Path(PY).parent / "deepspeed")
    run([deepspeed, "--num_gpus", "2", "launch/pretrain.py", "--config", str(CONFIG)], **env)
    print("\nTensorBoard logs: runs/tiny_cpu/tensorboard  (tensorboard --logdir runs)")
    print("Loss curve:       runs/tiny_cpu/loss.png")


def stage_export() -> None:
    run([PY, "launch/export.py", "--run", "runs/tiny_cpu", "--out", "exports/tiny_cpu"])
    run([PY, "launch/export.py", "--run", "runs/tiny_cpu", "--out", "exports/tiny_cpu_hf", "--format", "hf"])
    run([PY, "launch/generate.py", "--model", "exports/tiny_cpu", "--prompt", "The function returns",
         "--max-new-tokens", "40", "--num-samples", "2", "--seed", "1"])
    # the Hugging Face directory, loaded by transformers itself (AutoModelForCausalLM + AutoTokenizer)
    run([PY, "launch/hf_check.py", "--model", "exports/tiny_cpu_hf", "--prompt", "The function returns",
         "--max-new-tokens", "30"], HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")


def main() -> int:
    os.chdir(ROOT)
    try:
        stage_data()
        stage_pretrain()
        stage_export()
    except subprocess.CalledProcessError as exc:
        print(f"demo: a stage failed (exit {exc.returncode}): {' '.join(map(str, exc.cmd))}", file=sys.stderr)
        return 1
    print("\ndemo finished.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
