#!/usr/bin/env python
"""Bare sentencepiece or bare tiktoken over a JSONL corpus: the floor
bench/preprocess_bench.py compares with.

    python bench/_bare_tokenize.py CORPUS TOKENIZER WORKERS BATCH_BYTES BATCH_DOCS

``TOKENIZER`` is a sentencepiece ``.model`` file, or a directory with GPT-2's
``encoder.json`` + ``vocab.bpe`` (GPT-2's layout: byte ids in GPT-2's order, merges from
256, ``<|endoftext|>`` last), loaded the way tiktoken builds its own ``gpt2`` encoding
(``tiktoken.load.data_gym_to_mergeable_bpe_ranks``, which checks the ids against the
merges) and encoded with ``encode_ordinary`` one text at a time.

It reads and JSON-decodes every line in the parent, cuts the texts into batches by the
same rule as the pipeline (``BATCH_BYTES`` of input or ``BATCH_DOCS`` documents), encodes
them in a pool of ``WORKERS`` processes (``encode`` of a list, one thread per process)
and gets each batch's ids back as one uint16 array. Nothing is cleaned, filtered,
deduplicated or written. It prints one JSON line: ``encode_seconds`` (from the first
batch submitted to the last result, the pool started and every worker's model loaded
before), ``tokens`` and ``documents``. Its wall time, start-up included, is measured by
the caller.

Only the standard library, numpy and sentencepiece or tiktoken are imported, as a
hand-written tokenize script would.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np

_ENCODE = None  # list of texts -> list of id lists


def _init(model: str) -> None:
    global _ENCODE
    if model.endswith(".model"):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=model)
        _ENCODE = lambda texts: sp.encode(texts, num_threads=1)
        return
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the local files, never a cached copy
    ranks = data_gym_to_mergeable_bpe_ranks(os.path.join(model, "vocab.bpe"), os.path.join(model, "encoder.json"))
    enc = tiktoken.Encoding("gpt2-local", mergeable_ranks=ranks, special_tokens={"<|endoftext|>": len(ranks)},
                            pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    _ENCODE = lambda texts: [enc.encode_ordinary(t) for t in texts]


def _ping(_: int = 0) -> int:
    return os.getpid()


def _encode(texts: list[str]) -> np.ndarray:
    ids = _ENCODE(texts)
    return np.concatenate([np.asarray(x, dtype=np.uint16) for x in ids]) if ids else np.zeros(0, np.uint16)


def main(argv: list[str]) -> int:
    corpus, model, workers, batch_bytes, batch_docs = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    batches: list[list[str]] = [[]]
    size = 0
    with open(corpus, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            batches[-1].append(json.loads(line)["text"])
            size += len(line)
            if size >= batch_bytes or len(batches[-1]) >= batch_docs:
                batches.append([])
                size = 0
    batches = [b for b in batches if b]
    with mp.get_context("fork").Pool(workers, initializer=_init, initargs=(model,)) as pool:
        pool.map(_ping, range(workers * 4))
        t0 = time.perf_counter()
        tokens = sum(len(a) for a in pool.imap(_encode, batches))
        seconds = time.perf_counter() - t0
    print(json.dumps({"encode_seconds": seconds, "tokens": tokens, "documents": sum(map(len, batches))}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
