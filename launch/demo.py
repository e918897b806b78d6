#!/usr/bin/env python
"""`make demo`: the whole workflow end to end on the embedded sample corpus, on CPU.

1. data:      sample corpus (text already on this machine) -> sentencepiece BPE -> shards
2. pretrain:  the tiny GPT-2 on 2 ranks under the DeepSpeed launcher (gloo on CPU)
3. export:    consolidated safetensors + Hugging Face directory, and a few generations
4. finetune:  GPT-1 fine-tuning of the exported model on a multiple-choice task built from the
              corpus (which of 4 continuations really follows a passage), next to the same
              fine-tuning from random initialisation and the majority-class baseline

Each stage is skipped when its output is already there, so re-running is cheap.
"""

from __future__ import annotations

import json
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


FT_CONFIG = ROOT / "configs" / "finetune_tiny_multiple_choice.json"
FT_OVERRIDES = ["finetune.epochs=3", "training.global_batch_size=16", "training.micro_batch_size=8", "optimizer.lr=1e-3"]


def stage_finetune() -> None:
    tasks = DATA / "tasks"
    if not (tasks / "multiple_choice" / "test.jsonl").exists():
        sys.path.insert(0, str(ROOT))
        # after the sys.path.insert above: the demo runs from a clone, and builds tasks only once
        from gpt_dist.finetune.demo_tasks import build_demo_tasks

        build_demo_tasks(DATA / "corpus.jsonl", tasks, per_split={"train": 800, "valid": 200, "test": 200},
                         context_words=24, choice_words=8)
        print(f"tasks: {tasks}/{{multiple_choice,entailment,similarity,classification}}/{{train,valid,test}}.jsonl")
    env = {"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "DS_ACCELERATOR": "cpu"}
    deepspeed = shutil.which("deepspeed") or str(Path(PY).parent / "deepspeed")
    runs = {"pre-trained (exports/tiny_cpu)": "finetune_tiny_multiple_choice",
            "random initialisation": "finetune_tiny_multiple_choice_scratch"}
    for label, name in runs.items():
        extra = [] if "pre-trained" in label else ["checkpoint.init_from=null", f"run.name={name}"]
        run([deepspeed, "--num_gpus", "2", "launch/finetune.py", "--config", str(FT_CONFIG),
             "--set", *FT_OVERRIDES, *extra], **env)
    print("\nGPT-1 fine-tuning, multiple choice (which of 4 continuations follows the passage):")
    print("| initialisation | valid accuracy | test accuracy |\n|---|---|---|")
    majority = None
    for label, name in runs.items():
        res = json.loads((ROOT / "runs" / name / "results.json").read_text())
        majority = res["majority_baseline"]["accuracy"]
        print(f"| {label} | {res['valid']['accuracy']:.3f} | {res.get('test', {}).get('accuracy', float('nan')):.3f} |")
    print(f"| majority class (baseline) | {majority:.3f} | |")
    print("(the paper's Table 5 ablation: without pre-training GPT-1 loses 14.8 points on average)")


def main() -> int:
    os.chdir(ROOT)
    try:
        stage_data()
        stage_pretrain()
        stage_export()
        stage_finetune()
    except subprocess.CalledProcessError as exc:
        print(f"demo: a stage failed (exit {exc.returncode}): {' '.join(map(str, exc.cmd))}", file=sys.stderr)
        return 1
    print("\ndemo finished.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
