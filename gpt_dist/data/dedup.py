"""Exact and near-duplicate detection across all inputs, in bounded memory.

Exact duplicates: an 8-byte BLAKE2b hash of the cleaned text. Near duplicates: MinHash
over word-anchored character shingles with LSH banding, as WebText/OpenWebText did
(Jaccard threshold 0.8 by default).

Why not datasketch's ``MinHashLSH`` index: measured on this project's machine it costs
about 3.6 KB and 250 us per document in the parent (dicts of Python sets of bytes
keys), i.e. 3.4 GiB per million documents. Here each band of a signature is reduced to
one 64-bit key, and keys live in :class:`UInt64Set`, a sorted NumPy array (8 bytes per
key) plus a small buffer of recent keys; with 9 bands that is about 80 bytes per kept
document (see docs/data.md for the measured figures). A band-key match is treated as a
duplicate without re-checking the full signatures: exactly datasketch's ``MinHashLSH``
semantics (``query`` returns candidates that share a band).

The MinHash values themselves are datasketch's ``affine32`` scheme (MurmurHash3
finalizer, then ``a * h + b`` mod 2**32 with datasketch's own permutation parameters),
computed for a whole document at once with NumPy: ``MinHash.update_batch`` loops in
Python and costs about as much as tokenizing the document.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

_P = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime, odd so it is invertible mod 2**64
_MAX_DOC_BYTES = 1 << 20  # shingles are taken from the first MiB of a document


@dataclass(frozen=True)
class DedupConfig:
    """Deduplication settings (recorded in the manifest)."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # Jaccard similarity above which a document is a near duplicate
    num_perm: int = 128
    shingle_bytes: int = 24  # a window of this many bytes at every word start (about 5 words)
    sample: int = 4  # MinHash over 1 in `sample` shingles, chosen by hash (4x cheaper)
    seed: int = 1

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@lru_cache(maxsize=8)
def optimal_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising false positives + false negatives, as datasketch's
    ``MinHashLSH`` chooses them (equal weights); (9, 13) for 0.8 and 128 permutations."""
    xs_lo = np.linspace(0.0, threshold, 401)
    xs_hi = np.linspace(threshold, 1.0, 401)
    best, best_err = (1, 1), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - xs_lo ** r) ** b, xs_lo)
            fn = np.trapezoid(1 - (1 - (1 - xs_hi ** r) ** b), xs_hi)
            if fp + fn < best_err:
                best, best_err = (b, r), fp + fn
    return best


@lru_cache(maxsize=4)
def _tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Powers of P and of its inverse mod 2**32, for O(1) rolling-window hashes."""
    p = np.uint32(int(_P) & 0xFFFFFFFF)
    inv = np.uint32(pow(int(p), -1, 1 << 32))
    pw = np.empty(n + 1, dtype=np.uint32)
    ipw = np.empty(n + 1, dtype=np.uint32)
    pw[0] = ipw[0] = 1
    with np.errstate(over="ignore"):
        np.cumprod(np.full(n, p, dtype=np.uint32), out=pw[1:])
        np.cumprod(np.full(n, inv, dtype=np.uint32), out=ipw[1:])
    return pw, ipw


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, as datasketch applies it before permuting."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def affine32_permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's ``MinHash(num_perm, seed, scheme="affine32").permutations``: odd
    multipliers ``a`` and offsets ``b`` (uint32) drawn from ``RandomState(seed)``.

    Computed here because importing datasketch costs ~2.5 s (it pulls in scipy) in every
    preprocessing worker; tests/data_tools/test_dedup.py checks the values are equal.
    """
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


class MinHasher:
    """Band keys of one document: ``bands`` uint64 values, equal for similar documents."""

    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        self.bands, self.rows = optimal_bands(cfg.threshold, cfg.num_perm)
        a, b = affine32_permutations(self.bands * self.rows, cfg.seed)
        self._a = np.asarray(a, dtype=np.uint32)[:, None]
        self._b = np.asarray(b, dtype=np.uint32)[:, None]
        with np.errstate(over="ignore"):
            self._row_pw = _P ** np.arange(self.rows, dtype=np.uint64)
        self._salt = np.arange(self.bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)

    def shingle_hashes(self, text: str) -> np.ndarray:
        """32-bit hashes (with repeats) of the windows of ``shingle_bytes`` bytes that
        start at a word start of the lowercased UTF-8 text; the whole text if shorter.

        A polynomial rolling hash mod 2**32: window ``[s, s+w)`` is
        ``(prefix[s+w] - prefix[s]) * P**-s``, so all windows cost two vector passes.
        """
        c = np.frombuffer(text.lower().encode("utf-8")[:_MAX_DOC_BYTES], dtype=np.uint8)
        n, w = len(c), self.cfg.shingle_bytes
        pw, ipw = _tables(_MAX_DOC_BYTES)
        prefix = np.zeros(n + 1, dtype=np.uint32)
        with np.errstate(over="ignore"):
            np.cumsum(c * pw[:n], out=prefix[1:])
            starts = np.flatnonzero((c[:-1] <= 32) & (c[1:] > 32)) + 1
            if n and c[0] > 32:
                starts = np.concatenate(([0], starts))
            starts = starts[starts + w <= n]
            if len(starts) == 0:
                starts, w = np.zeros(1, dtype=np.int64), n
            return (prefix[starts + w] - prefix[starts]) * ipw[starts]

    def sampled(self, text: str) -> np.ndarray:
        """Shingle hashes consistently subsampled to about 1/``sample`` by their top bits
        (the same shingle is kept in every document), then mixed as datasketch mixes
        them; documents with few shingles keep them all."""
        h = self.shingle_hashes(text)
        if self.cfg.sample > 1:
            kept = h[h < np.uint32((1 << 32) // self.cfg.sample)]
            if len(kept) >= 32:
                h = kept
        return _fmix32(h)

    def signature(self, text: str) -> np.ndarray:
        """The ``bands * rows`` MinHash values (uint32): datasketch's ``affine32``
        ``MinHash.update_batch`` over the sampled shingles (repeats do not change a min)."""
        hv = self.sampled(text)
        with np.errstate(over="ignore"):
            return (self._a * hv[None, :] + self._b).min(axis=1)

    def band_keys(self, text: str) -> np.ndarray:
        sig = self.signature(text).astype(np.uint64).reshape(self.bands, self.rows)
        with np.errstate(over="ignore"):
            return (sig * self._row_pw).sum(axis=1) ^ self._salt


    def band_keys_batch(self, texts: list[str]) -> np.ndarray:
        """:meth:`band_keys` of several documents at once, equal row for row (a test checks).

        Why: per document, :meth:`band_keys` makes ~20 small NumPy calls, and on an
        11 MB corpus of ~4 KB documents that call overhead was half of the MinHash cost.
        Here the texts are joined with a space (a word boundary, so every document's
        word starts are the same as alone), the rolling hashes of all windows come from
        one prefix sum (a window's hash does not depend on where it starts), and the
        per-document minima come from one ``minimum.reduceat``.
        """
        if not texts:
            return np.zeros((0, self.bands), dtype=np.uint64)
        bufs = [t.lower().encode("utf-8")[:_MAX_DOC_BYTES] for t in texts]
        n_docs = len(bufs)
        lens = np.fromiter(map(len, bufs), dtype=np.int64, count=n_docs)
        begin = np.zeros(n_docs, dtype=np.int64)
        np.cumsum(lens[:-1] + 1, out=begin[1:])
        end = begin + lens
        c = np.frombuffer(b" ".join(bufs), dtype=np.uint8)
        n, w = len(c), self.cfg.shingle_bytes
        pw, ipw = _tables(1 << max(n, _MAX_DOC_BYTES).bit_length())
        prefix = np.zeros(n + 1, dtype=np.uint32)
        with np.errstate(over="ignore"):
            np.cumsum(c * pw[:n], out=prefix[1:])
            starts = np.flatnonzero((c[:-1] <= 32) & (c[1:] > 32)) + 1
            if n and c[0] > 32:
                starts = np.concatenate(([0], starts))
            doc = np.searchsorted(begin, starts, side="right") - 1
            inside = starts + w <= end[doc]
            starts, doc = starts[inside], doc[inside]
            widths = np.full(len(starts), w, dtype=np.int64)
            lonely = np.flatnonzero(np.bincount(doc, minlength=n_docs) == 0)
            if len(lonely):  # no full window: the whole text is the one shingle
                starts = np.concatenate((starts, begin[lonely]))
                doc = np.concatenate((doc, lonely))
                widths = np.concatenate((widths, lens[lonely]))
                order = np.argsort(doc, kind="stable")
                starts, doc, widths = starts[order], doc[order], widths[order]
            h = (prefix[starts + widths] - prefix[starts]) * ipw[starts]
            if self.cfg.sample > 1:
                keep = h < np.uint32((1 << 32) // self.cfg.sample)
                keep |= (np.bincount(doc[keep], minlength=n_docs) < 32)[doc]
                h, doc = h[keep], doc[keep]
            hv = _fmix32(h)
            first = np.searchsorted(doc, np.arange(n_docs))
            values = self._a * hv[None, :]
            values += self._b
            sig = np.minimum.reduceat(values, first, axis=1).T
            keys = (sig.astype(np.uint64).reshape(n_docs, self.bands, self.rows) * self._row_pw).sum(axis=2)
            return keys ^ self._salt


def exact_key(text: str) -> int:
    """64-bit hash of the cleaned text (exact-duplicate key)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class UInt64Set:
    """A set of uint64 keys in about 8 bytes per key.

    Recent keys sit in a Python set; every ``buffer`` keys they are merged into a sorted
    NumPy array (a linear merge of two sorted runs), so memory is 8 bytes per key plus
    at most ``buffer`` Python ints (~70 bytes each) and a transient copy during a merge.
    """

    def __init__(self, buffer: int = 1 << 18) -> None:
        self._sorted = np.empty(0, dtype=np.uint64)
        self._recent: set[int] = set()
        self._buffer = buffer

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def contains_any(self, keys: np.ndarray) -> bool:
        if not self._recent.isdisjoint(keys.tolist()):
            return True
        if not len(self._sorted):
            return False
        idx = np.searchsorted(self._sorted, keys)
        idx[idx == len(self._sorted)] = 0
        return bool((self._sorted[idx] == keys).any())

    def contains(self, key: int) -> bool:
        """``key in self`` for one key (no array built: the exact check runs per document)."""
        if key in self._recent:
            return True
        if not len(self._sorted):
            return False
        k = np.uint64(key)
        i = int(np.searchsorted(self._sorted, k))
        return i < len(self._sorted) and bool(self._sorted[i] == k)

    def add(self, keys: np.ndarray | list[int]) -> None:
        self._recent.update(keys.tolist() if isinstance(keys, np.ndarray) else keys)
        # the buffer grows with the set so that merges cost O(n log n) in total
        if len(self._recent) >= max(self._buffer, len(self._sorted) // 16):
            self._merge()

    def _merge(self) -> None:
        new = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
        new.sort()
        merged = np.concatenate((self._sorted, new))
        merged.sort(kind="stable")  # timsort: two sorted runs merge in linear time
        self._sorted = merged
        self._recent = set()

    def nbytes(self) -> int:
        """Approximate memory held (array + buffered Python ints)."""
        return int(self._sorted.nbytes) + 70 * len(self._recent)


class Deduplicator:
    """Exact + near-duplicate decisions in input order (the parent process owns it)."""

    def __init__(self, cfg: DedupConfig, bands: int) -> None:
        self.cfg = cfg
        self.bands = bands
        self.exact = UInt64Set()
        self.near = UInt64Set()

    def check(self, exact: int, band_keys: np.ndarray | None) -> str | None:
        """"exact", "near" or None (kept); a kept document's keys are remembered."""
        if self.cfg.exact and self.exact.contains(exact):
            return "exact"
        if self.cfg.near and band_keys is not None and self.near.contains_any(band_keys):
            return "near"
        if self.cfg.exact:
            self.exact.add([exact])
        if self.cfg.near and band_keys is not None:
            self.near.add(band_keys)
        return None

    def restore(self, keys: np.ndarray) -> None:
        """Re-add the keys of documents kept before a resume point (rows of
        ``[exact, band_0 .. band_{b-1}]``, see :meth:`row`)."""
        if len(keys):
            if self.cfg.exact:
                self.exact.add(keys[:, 0].copy())
            if self.cfg.near:
                self.near.add(keys[:, 1:].ravel().copy())

    def row(self, exact: int, band_keys: np.ndarray | None) -> np.ndarray:
        out = np.zeros(1 + self.bands, dtype=np.uint64)
        out[0] = exact
        if band_keys is not None:
            out[1:] = band_keys
        return out

    def nbytes(self) -> int:
        return self.exact.nbytes() + self.near.nbytes()
