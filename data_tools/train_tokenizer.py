#!/usr/bin/env python
"""Train a sentencepiece BPE tokenizer (byte fallback, GPT special tokens).

    python data_tools/train_tokenizer.py --input data/sample/corpus.jsonl --vocab-size 2048 --out DIR

GPT-1 used a BPE with 40,000 merges (--vocab-size 40478 here counts the merges plus the
256 byte pieces, <unk> and the special tokens <|endoftext|>, <|start|>, <|delimiter|>,
<|extract|>). Writes DIR/tokenizer.model and DIR/gpt_dist_tokenizer.json (kind, special
ids, fingerprint); load it with gpt_dist.tokenizer.load_tokenizer(DIR).
"""

from __future__ import annotations

import argparse
import sys
import time

from gpt_dist.data.readers import InputError
from gpt_dist.tokenizer import TokenizerError, train_tokenizer

PROG = "train_tokenizer"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL / .jsonl.gz / text files, globs or directories")
    p.add_argument("--vocab-size", type=int, required=True, help="total vocabulary (pieces + bytes + specials)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--json-key", default="text", help="JSONL key holding the text (default: text)")
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="sample at most this many training chunks")
    p.add_argument("--verbose", action="store_true", help="show sentencepiece's training log")
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        tok = train_tokenizer(args.input, args.vocab_size, args.out, text_key=args.json_key,
                              max_sentences=args.max_sentences, verbose=args.verbose)
    except (TokenizerError, InputError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: error: {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"{PROG}: vocab {tok.vocab_size}, special ids {tok.special_ids}, fingerprint {tok.fingerprint[:16]} "
          f"-> {args.out} ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
