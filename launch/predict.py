#!/usr/bin/env python
"""Predict with a fine-tuned export: one JSON line per input example (label, probabilities).

    python launch/predict.py --model runs/NAME/best --input new.jsonl --out preds.jsonl

The input has the task's fields (labels optional); the export's fine-tuning config says how
it is transformed and truncated. Errors are one line naming the file (and line); exit 2.
"""

from __future__ import annotations

import argparse
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
    args = ap.parse_args(argv)
    from gpt_dist.config import ConfigError
    from gpt_dist.export import ExportError
    from gpt_dist.finetune.predict import predict_file
    from gpt_dist.finetune.tasks import TaskFileError

    try:
        n = predict_file(args.model, args.input, args.out, args.batch_size, args.device)
    except (TaskFileError, ExportError, ConfigError) as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return 2
    print(f"predicted {n} examples -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
