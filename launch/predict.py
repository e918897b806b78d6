#!/usr/bin/env python
"""Predict with a fine-tuned export: one JSON line per input example (label, probabilities).

    python launch/predict.py --model runs/NAME/best --input new.jsonl --out preds.jsonl
    torchrun --nproc-per-node 2 launch/predict.py --model runs/NAME/best --pp 2 --input ... --out ...

The input has the task's fields (labels optional); the export's fine-tuning config says how
it is transformed and truncated, and how the model and its head are built. Under torchrun the
model is split --tp x --pp ways (default: tensor parallel over the world size); rank 0 writes.
Errors are one line naming the file (and line); exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a fine-tuned export (e.g. RUN_DIR/best)")
    ap.add_argument("--input", required=True, help="JSONL examples")
    ap.add_argument("--out", required=True, help="predictions JSONL")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: world size / pp)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    args = ap.parse_args(argv)
    # torch + megatron-core (~3 s): imported after the arguments parse, so --help and usage errors are instant
    from gpt_dist.config import ConfigError
    from gpt_dist.export import ExportError
    from gpt_dist.finetune.predict import predict_file
    from gpt_dist.finetune.tasks import TaskFileError
    from gpt_dist.inference import InferenceError, open_context
    from gpt_dist.parallel import discover_launch_env

    discover_launch_env()
    tp = args.tp or max(int(os.environ["WORLD_SIZE"]) // max(args.pp, 1), 1)
    try:
        with open_context(tp, args.pp, args.device) as ctx:
            n = predict_file(args.model, args.input, args.out, ctx, args.batch_size)
            rank = ctx.rank
    except (TaskFileError, ExportError, ConfigError, InferenceError) as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"predicted {n} examples -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
