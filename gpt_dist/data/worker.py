"""The work done per document in preprocessing worker processes.

A batch of raw records goes in; per record one small tuple comes out, in order:

    (REJECT, code, message, excerpt)                       bad input
    (FILTER, name, surrogates, controls)                   dropped by a quality filter
    (KEEP, tokens, exact_key, band_keys, text_bytes, surrogates, controls)

Tokens are a NumPy array of the shard dtype with the end-of-document id appended, so
results pickle compactly. Deduplication itself happens in the parent, in input order:
workers only compute the keys, which makes the output independent of worker count.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpt_dist.data.clean import CleanConfig, clean_text, filter_reason, parse_record
from gpt_dist.data.dedup import DedupConfig, MinHasher, exact_key
from gpt_dist.tokenizer import Tokenizer, load_tokenizer

REJECT, FILTER, KEEP = 0, 1, 2


@dataclass(frozen=True)
class WorkerConfig:
    tokenizer: str
    clean: CleanConfig
    dedup: DedupConfig
    dtype: str


_STATE: dict[str, Any] = {}


def init_worker(cfg: WorkerConfig, in_child: bool = True, tok: Tokenizer | None = None) -> None:
    """Load the tokenizer once per process, or take ``tok``, the parent's, which forked
    children inherit without pickling or reading the files again (GPT-2's BPE takes about
    0.1 s of CPU to load, per process). Children ignore SIGINT: the parent decides
    how to stop, so Ctrl-C never leaves half-written results behind. SIGTERM gets its
    default action back: forked children inherit the parent's handler (which turns it into
    KeyboardInterrupt), and the pool terminates the survivors with SIGTERM when a worker
    dies, which then printed a traceback per worker."""
    if in_child:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    tok = tok if tok is not None else load_tokenizer(cfg.tokenizer)
    _STATE.update(cfg=cfg, tok=tok, eod=tok.eod_id, dtype=np.dtype(cfg.dtype),
                  minhash=MinHasher(cfg.dedup) if cfg.dedup.near else None)


def ping() -> int:
    """Submitted once per worker at start-up so every worker is loaded before timing."""
    return os.getpid()


def _excerpt(data: bytes | None) -> str:
    return "" if data is None else data[:120].decode("utf-8", "replace")


def process_batch(batch: list[tuple[bytes | None, str | None, str]], tokenize: bool = True,
                  hashes: bool = True) -> list[tuple[Any, ...]]:
    """Parse, clean, filter, hash and tokenize a batch of ``(data, error, kind)``.

    The staged job (gpt_dist.data.staged) hashes in one stage and tokenizes in another:
    ``tokenize=False`` leaves ``tokens`` None, ``hashes=False`` the two keys."""
    cfg: WorkerConfig = _STATE["cfg"]
    out: list[tuple[Any, ...] | None] = [None] * len(batch)
    keep_texts: list[str] = []
    keep_slots: list[tuple[int, int, int]] = []
    for i, (data, error, kind) in enumerate(batch):
        if error is not None or data is None:
            code = "too_large" if error and ("longer" in error or "larger" in error) else "unreadable"
            out[i] = (REJECT, code, error or "unreadable", _excerpt(data))
            continue
        text, code, message = parse_record(data, kind, cfg.clean.text_key)
        if text is None:
            out[i] = (REJECT, code, message, _excerpt(data))
            continue
        cleaned = clean_text(text, cfg.clean.unicode_form)
        if not cleaned.text:
            out[i] = (REJECT, "empty", "empty text after cleaning", _excerpt(data))
            continue
        reason = filter_reason(cleaned.text, cfg.clean)
        if reason is not None:
            out[i] = (FILTER, reason, cleaned.surrogates, cleaned.controls)
            continue
        keep_texts.append(cleaned.text)
        keep_slots.append((i, cleaned.surrogates, cleaned.controls))
    if keep_texts:
        tok = _STATE["tok"]
        minhash: MinHasher | None = _STATE["minhash"]
        eod, dtype = _STATE["eod"], _STATE["dtype"]
        n = len(keep_texts)
        bands = _band_keys(minhash, keep_texts) if minhash is not None and hashes else [None] * n
        encoded = tok.encode_batch(keep_texts) if tokenize else [None] * n
        for (i, surrogates, controls), text, ids, keys in zip(keep_slots, keep_texts, encoded, bands):
            tokens = None
            if ids is not None:
                tokens = np.empty(len(ids) + 1, dtype=dtype)
                tokens[:-1] = ids
                tokens[-1] = eod
            out[i] = (KEEP, tokens, exact_key(text) if hashes else None, keys, len(text.encode("utf-8")),
                      surrogates, controls)
    return out  # type: ignore[return-value]


def _band_keys(minhash: MinHasher, texts: list[str], group_chars: int = 1 << 18) -> list[np.ndarray]:
    """MinHash band keys of ``texts``, computed a group of documents at a time (about
    ``group_chars`` characters: larger groups fall out of the CPU cache, smaller ones pay
    NumPy's per-call overhead again)."""
    out: list[np.ndarray] = []
    start, size = 0, 0
    for k, text in enumerate(texts):
        size += len(text)
        if size >= group_chars or k == len(texts) - 1:
            out.extend(minhash.band_keys_batch(texts[start:k + 1]))
            start, size = k + 1, 0
    return out
