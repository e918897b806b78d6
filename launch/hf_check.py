"""Load a ``--format hf`` export with Hugging Face transformers (offline) and continue a prompt.

    python launch/hf_check.py --model exports/NAME_hf [--prompt TEXT] [--max-new-tokens 30]

Prints the classes transformers picked, the greedy continuation from ``model.generate``, and
whether it equals gpt_dist's own greedy generation (launch/generate.py) on the same directory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a launch/export.py --format hf directory")
    ap.add_argument("--prompt", default="The function returns")
    ap.add_argument("--max-new-tokens", type=int, default=30)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    try:
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {args.model}: transformers cannot load it ({str(exc).splitlines()[0]})") from None
    print(f"transformers: {type(model).__name__} + {type(tok).__name__} "
          f"(vocab {model.config.vocab_size}, eos {tok.eos_token!r} = {tok.eos_token_id})")
    ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    # decoded with the prompt: alone, the continuation's first word would lose its space
    print(f"greedy: {tok.decode(ids[0].tolist() + out, skip_special_tokens=True)}")
    with contextlib.redirect_stdout(sys.stderr):
        # under redirect_stdout: DeepSpeed's logger binds sys.stdout when first imported (the report is stdout)
        from gpt_dist.inference import open_context
        from gpt_dist.inference.generate import generate, load_model

        ctx = open_context(1, 1, "cpu")
    with ctx:  # one process; its groups are destroyed on the way out
        loaded = load_model(args.model, ctx)
        if loaded.tokenizer is not None:
            same_ids = loaded.tokenizer.encode(args.prompt) == ids[0].tolist()
            ours = generate(loaded, ids[0].tolist(), args.max_new_tokens, temperature=0.0,
                            eos_id=tok.eos_token_id)[0]
            print(f"same prompt ids as gpt_dist's tokenizer: {same_ids}; "
                  f"same continuation as launch/generate.py: {ours == out[: len(ours)] and len(ours) == len(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
