"""Export a training checkpoint (any TP/PP layout, ZeRO 0-3) to a safetensors model directory.

    python launch/export.py --run RUN_DIR [--step N] --out DIR [--format native|hf] [--dtype fp32|bf16]

native: GPT-2 names, full tensors, our config (loadable by checkpoint.init_from in any layout,
and by launch/generate.py). hf: a transformers GPT2LMHeadModel / OpenAIGPTLMHeadModel
directory with a fast tokenizer (tokenizer.json) whose ids equal the run's tokenizer:
``AutoModelForCausalLM.from_pretrained(DIR)`` / ``AutoTokenizer.from_pretrained(DIR)`` load it
offline (launch/hf_check.py shows it). Errors are one line naming the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory (or a checkpoints/global_stepN directory)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--format", choices=["native", "hf"], default="native")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--eod-id", type=int, default=None,
                    help="end-of-document id (default: from the run's tokenizer)")
    ap.add_argument("--no-hash", action="store_true", help="check sizes only, not sha256 (faster)")
    args = ap.parse_args(argv)
    # torch (~1 s): imported after the arguments parse, so --help and usage errors are instant
    from gpt_dist.export import ExportError, export_checkpoint

    try:
        out = export_checkpoint(Path(args.run), Path(args.out), step=args.step, fmt=args.format,
                                dtype=args.dtype, eod_id=args.eod_id, check_hash=not args.no_hash)
    except ExportError as exc:
        raise SystemExit(f"error: {exc}") from None
    info = json.loads((out / "export.json").read_text())
    print(f"exported step {info.get('step')} ({args.format}, {args.dtype}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
