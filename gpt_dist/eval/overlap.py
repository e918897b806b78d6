"""How much of each test set the training data already contained (GPT-2 §4, "Generalization
vs Memorization": 8-gram Bloom filters over WebText).

The training shards are token ids, so n-grams are of token ids, with the model's tokenizer
(training refuses shards of another tokenizer, so test texts encode to the same ids). GPT-2
used 8-grams of normalised words; 8 GPT-2 BPE tokens are about 6 words, but with a small
vocabulary (a few hundred pieces, mostly characters) 8 tokens are one or two words and
common phrases match everywhere: raise ``--overlap-n`` to keep the n-gram near 6 words.

* every n-gram (default n = 8) of every training document (none across a document boundary)
  goes into one Bloom filter, read shard by shard through memory maps in chunks, with
  megatron-core's index (``gpt_dist.data.indexed``) for the document boundaries;
* the filter is sized for the stated false-positive rate ``p`` with one item per training
  token (an upper bound on the distinct n-grams): ``m = -N ln p / (ln 2)^2`` bits and
  ``k = round(m / N ln 2)`` hash functions (double hashing of a 64-bit n-gram hash).
  ``p = 1e-4`` costs 19.2 bits (2.4 bytes) per training token; the report states ``m``,
  ``k``, ``N`` and the rate the filter actually reaches (``(1 - e^{-kN/m})^k``);
* it is built once per shard set (key: the shards' content fingerprints, n, p) and cached
  as ``.npy`` + ``.json``, written atomically;
* an example overlaps when at least ``threshold`` of its n-grams (default: any one, as
  lm-eval's decontamination flags an example) are in the filter. Per task: the share of
  examples that overlap, the share of all test n-grams found (GPT-2's Table 6 figure),
  and the metrics on the clean subset (``metrics_clean`` in the results).

Why a hand-written filter: the field's Bloom filters (``pybloom``, ``rbloom``) hash Python
objects one at a time; a NumPy bit array takes the hashes of a whole chunk of n-grams at once.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from gpt_dist.data.indexed import list_shards, open_indexed, read_index_arrays, shard_fingerprint
from gpt_dist.eval.model import EvalError
from gpt_dist.utils import atomic_write_bytes, atomic_write_text

_MUL = np.uint64(0x9E3779B97F4A7C15)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads the polynomial hash over all 64 bits."""
    h = h.copy()
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of every n-gram of ``tokens`` (uint64 wrap-around arithmetic)."""
    t = np.asarray(tokens, dtype=np.uint64)
    if len(t) < n:
        return np.zeros(0, dtype=np.uint64)
    count = len(t) - n + 1
    h = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _MUL + t[j: j + count] + np.uint64(1)
    return _mix(h)


class BloomFilter:
    def __init__(self, n_items: int, fp_rate: float) -> None:
        if not 0.0 < fp_rate < 1.0:
            raise ValueError(f"--overlap-fp-rate must be in (0, 1), got {fp_rate}")
        n_items = max(int(n_items), 1)
        self.m = max(64, math.ceil(-n_items * math.log(fp_rate) / math.log(2) ** 2))
        self.k = max(1, round(self.m / n_items * math.log(2)))
        self.bits = np.zeros((self.m + 7) // 8, dtype=np.uint8)
        self.items, self.capacity, self.fp_target = 0, n_items, fp_rate

    def _positions(self, h: np.ndarray) -> np.ndarray:
        m = np.uint64(self.m)
        h1 = h % m
        h2 = (_mix(h ^ np.uint64(0xA5A5A5A5A5A5A5A5)) | np.uint64(1)) % m
        ks = np.arange(self.k, dtype=np.uint64)[:, None]
        with np.errstate(over="ignore"):
            return (h1[None, :] + ks * h2[None, :]) % m                      # [k, count]

    def add(self, h: np.ndarray) -> None:
        pos = self._positions(h).ravel()
        np.bitwise_or.at(self.bits, (pos >> np.uint64(3)).astype(np.int64),
                         (np.uint8(1) << (pos & np.uint64(7)).astype(np.uint8)))
        self.items += len(h)

    def contains(self, h: np.ndarray) -> np.ndarray:
        if len(h) == 0:
            return np.zeros(0, dtype=bool)
        pos = self._positions(h)
        hit = (self.bits[(pos >> np.uint64(3)).astype(np.int64)] >> (pos & np.uint64(7)).astype(np.uint8)) & 1
        return hit.all(axis=0)

    def describe(self) -> dict[str, Any]:
        actual = (1.0 - math.exp(-self.k * self.items / self.m)) ** self.k
        return {"bits": self.m, "bytes": len(self.bits), "hashes": self.k, "items": self.items,
                "fp_rate_target": self.fp_target, "fp_rate": actual}


def _shard_docs(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens memory map, document end offsets) of one shard, checked first."""
    ds = open_indexed(prefix)
    lengths, _ = read_index_arrays(prefix)
    tokens = np.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r")
    return tokens, np.cumsum(lengths.astype(np.int64))


def build_filter(prefixes: list[str], n: int, fp_rate: float, progress: bool = True,
                 chunk: int = 1 << 22) -> BloomFilter:
    shards = [(p, *_shard_docs(p)) for p in prefixes]
    total = sum(int(ends[-1]) if len(ends) else 0 for _, _, ends in shards)
    bloom = BloomFilter(total, fp_rate)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="overlap filter", unit="tok", unit_scale=True, dynamic_ncols=True)
    for _, tokens, ends in shards:
        doc_end = np.repeat(ends, np.diff(np.concatenate([[0], ends])))   # end of each token's document
        for start in range(0, len(doc_end), chunk):
            stop = min(start + chunk, len(doc_end))
            window = np.asarray(tokens[start: min(stop + n - 1, len(doc_end))])
            h = ngram_hashes(window, n)[: stop - start]
            valid = (np.arange(start, start + len(h)) + n) <= doc_end[start: start + len(h)]
            bloom.add(h[valid])
            if bar is not None:
                bar.update(stop - start)
    if bar is not None:
        bar.close()
    return bloom


def load_or_build(prefixes: list[str], n: int, fp_rate: float, cache_dir: str | Path | None,
                  progress: bool = True) -> tuple[BloomFilter, dict[str, Any]]:
    try:
        shards = [s for p in prefixes for s in list_shards(p)]
        fps = [shard_fingerprint(s) for s in shards]
    except (OSError, ValueError) as exc:
        raise EvalError(f"--overlap-with: {str(exc).splitlines()[0]}") from None
    key = hashlib.sha256(json.dumps({"shards": fps, "n": n, "p": fp_rate}).encode()).hexdigest()[:24]
    cache = Path(cache_dir) if cache_dir else Path(shards[0]).parent / ".overlap_cache"
    npy, meta = cache / f"bloom_{key}.npy", cache / f"bloom_{key}.json"
    if npy.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        bloom = BloomFilter(info["capacity"], info["fp_rate_target"])
        bloom.bits = np.load(npy)
        bloom.items = info["items"]
        if len(bloom.bits) == (bloom.m + 7) // 8:
            return bloom, {**bloom.describe(), "cache": str(npy), "cached": True, "shards": len(shards)}
    bloom = build_filter(shards, n, fp_rate, progress)
    cache.mkdir(parents=True, exist_ok=True)

    buf = io.BytesIO()
    np.save(buf, bloom.bits)
    atomic_write_bytes(npy, buf.getvalue())
    atomic_write_text(meta, json.dumps({**bloom.describe(), "capacity": bloom.capacity, "n": n, "shards": shards}))
    return bloom, {**bloom.describe(), "cache": str(npy), "cached": False, "shards": len(shards)}


def task_overlap(prefixes: list[str], tasks: list[Any], tok: Any, n: int = 8, cache_dir: str | Path | None = None,
                 fp_rate: float = 1e-4, threshold: float = 0.0, progress: bool = True) -> dict[str, Any]:
    """{task: {"summary": {...}, "clean": [bool per example]}} (module docstring)."""
    bloom, info = load_or_build(prefixes, n, fp_rate, cache_dir, progress)
    out: dict[str, Any] = {}
    for task in tasks:
        flags, found, total = [], 0, 0
        for i in range(len(task.docs)):
            hits = [bloom.contains(ngram_hashes(np.asarray(tok.encode(t), dtype=np.int64), n))
                    for t in task.texts(i)]
            k = sum(int(h.sum()) for h in hits)
            m = sum(len(h) for h in hits)
            found, total = found + k, total + m
            flags.append(m > 0 and k / m > threshold if threshold > 0 else k > 0)
        n_over = sum(flags)
        out[task.name] = {"clean": [not f for f in flags], "summary": {
            "ngram": n, "overlapping": n_over, "clean": len(flags) - n_over, "share": n_over / len(flags),
            "ngram_share": found / total if total else 0.0, "threshold": threshold,
            "overlapping_lines": [task.lines[i] for i, f in enumerate(flags) if f][:50], "filter": info}}
    return out
