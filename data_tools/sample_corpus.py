#!/usr/bin/env python
"""Write the embedded sample corpus: WebText-like JSONL from text already on this machine.

    python data_tools/sample_corpus.py --out data/sample/corpus.jsonl [--max-mb 4]

Documents are the docstrings, package descriptions and documentation files of the
installed Python standard library and packages (no download); see
``gpt_dist/data/sample_corpus.py`` for why and how.
"""

from __future__ import annotations

import argparse
import sys
import time

from gpt_dist.data.sample_corpus import write_sample_corpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output JSONL path")
    parser.add_argument("--max-mb", type=float, default=4.0, help="stop after this many MB of text (default 4)")
    parser.add_argument("--max-doc-chars", type=int, default=12_000, help="split longer documents (default 12000)")
    args = parser.parse_args(argv)
    t0 = time.time()
    try:
        counts = write_sample_corpus(args.out, int(args.max_mb * 1e6), args.max_doc_chars)
    except OSError as exc:
        return f"sample_corpus: error: {exc.filename or args.out}: {exc.strerror or exc}"  # type: ignore[return-value]
    print(f"sample_corpus: {counts['documents']} documents, {counts['text_bytes'] / 1e6:.1f} MB of text "
          f"-> {args.out} ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
