"""Generate text from an export (launch/export.py, native or hf) with the model's KV cache.

    python launch/generate.py --model EXPORT_DIR --prompt "Once upon a time" \
        [--max-new-tokens 100] [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 0] [--num-samples 1]

--temperature 0 is greedy decoding. Tokens stream to stdout as they are produced. An
export without a tokenizer takes --prompt-ids 1,2,3 and prints token ids.

Tensor and pipeline parallel (the same parallel model as training, the export sliced per
rank, through the inference runtime; rank 0 prints). --tp defaults to the world size / --pp:

    torchrun --nproc-per-node 2 launch/generate.py --model EXPORT_DIR --prompt "..."
    torchrun --nproc-per-node 2 launch/generate.py --model EXPORT_DIR --pp 2 --prompt "..."
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _stream_text(tok, prompt_ids: list[int]):
    """on_token callback printing the continuation as it grows, and the final flush; the text
    is decoded with the prompt (gpt_dist.inference.generate.TextStream), so a word that starts the
    continuation keeps its space."""
    # main() made the first import, under redirect_stdout (DeepSpeed's logger binds sys.stdout then)
    from gpt_dist.inference.generate import TextStream

    stream = TextStream(tok, prompt_ids)

    def on_token(_sample: int, t: int) -> None:
        sys.stdout.write(stream.push(t))
        sys.stdout.flush()

    def flush() -> None:
        sys.stdout.write(stream.flush())
        sys.stdout.flush()

    return on_token, flush


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="export directory (native or Hugging Face GPT-2/GPT-1)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a tokenizer in the export)")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None, help="sample i uses seed + i")
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-document token")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: world size / pp)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise SystemExit("error: --max-new-tokens and --num-samples must be >= 1")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise SystemExit("error: --top-p must be in (0, 1]")

    with contextlib.redirect_stdout(sys.stderr):
        # under redirect_stdout: DeepSpeed's logger binds sys.stdout when first imported (stdout: tokens only)
        from gpt_dist.inference import InferenceError, open_context
        from gpt_dist.parallel import discover_launch_env

    discover_launch_env()
    tp = args.tp or max(int(os.environ["WORLD_SIZE"]) // max(args.pp, 1), 1)
    try:
        # library chatter (DeepSpeed's logger binds sys.stdout when first imported) goes to
        # stderr: stdout carries only the generated text, so it can be piped
        with contextlib.redirect_stdout(sys.stderr):
            ctx = open_context(tp, args.pp, args.device)
    except InferenceError as exc:
        raise SystemExit(f"error: {exc}") from None
    with ctx:  # the process groups are destroyed on every way out (a SIGABRT at exit otherwise)
        return _generate(args, ctx)


def _generate(args: argparse.Namespace, ctx: Any) -> int:
    # main() made the first import, under redirect_stdout (DeepSpeed's logger binds sys.stdout then)
    from gpt_dist.export import ExportError
    from gpt_dist.inference import InferenceError
    from gpt_dist.inference.generate import generate, load_model

    try:
        with contextlib.redirect_stdout(sys.stderr):
            loaded = load_model(args.model, ctx)
    except (InferenceError, ExportError) as exc:
        raise SystemExit(f"error: {exc}") from None
    if ctx.rank != 0:  # every rank runs the model, rank 0 prints
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    tok = loaded.tokenizer
    if args.prompt is not None:
        if tok is None:
            raise SystemExit(f"error: {args.model}: no tokenizer in the export; use --prompt-ids")
        prompt = tok.encode(args.prompt)
        if not prompt:
            prompt = [tok.eod_id]  # an empty prompt starts a new document
    else:
        try:
            prompt = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise SystemExit("error: --prompt-ids: expected comma-separated integers") from None
    eos = None if args.no_stop else loaded.eod_id
    for i in range(args.num_samples):
        if args.num_samples > 1:
            sys.stdout.write(f"{'' if i == 0 else chr(10)}--- sample {i + 1} ---\n")
        if tok is not None and args.prompt is not None:
            sys.stdout.write(args.prompt)
            on_token, flush = _stream_text(tok, prompt)
        else:
            sys.stdout.write(" ".join(map(str, prompt)))

            def on_token(_s: int, t: int) -> None:
                sys.stdout.write(f" {t}")
                sys.stdout.flush()

            def flush() -> None:
                pass
        sys.stdout.flush()
        try:
            generate(loaded, prompt, args.max_new_tokens, 1, on_token=on_token, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p,
                     seed=None if args.seed is None else args.seed + i, eos_id=eos)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
        flush()
        sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
