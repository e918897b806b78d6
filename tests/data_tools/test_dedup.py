"""Exact and near-duplicate detection (gpt_dist.data.dedup)."""

from __future__ import annotations

import numpy as np
import pytest

from gpt_dist.data.dedup import (
    DedupConfig,
    Deduplicator,
    MinHasher,
    UInt64Set,
    exact_key,
    optimal_bands,
)
from tests.data_tools.dt_common import long_doc_index, near_copy


@pytest.fixture(scope="module")
def hasher() -> MinHasher:
    return MinHasher(DedupConfig())


def shingles(text: str, w: int = 24) -> set[str]:
    t = text.lower()
    starts = [i for i in range(len(t)) if (i == 0 or t[i - 1] <= " ") and t[i] > " "]
    return {t[i:i + w] for i in starts if i + w <= len(t)}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def test_optimal_bands_matches_datasketch() -> None:
    from datasketch import MinHashLSH

    for threshold in (0.5, 0.8, 0.9):
        lsh = MinHashLSH(threshold=threshold, num_perm=128)
        assert optimal_bands(threshold, 128) == (lsh.b, lsh.r)


def test_planted_exact_and_near_duplicates_found_distinct_kept(base_docs: list[str], hasher: MinHasher) -> None:
    docs = base_docs[:150]
    target = long_doc_index(docs, 20)
    near = near_copy(docs[target])
    far = near_copy(docs[target], every=6)  # many words changed: a different document
    assert jaccard(docs[target], near) > 0.85
    assert jaccard(docs[target], far) < 0.6
    planted = docs + [docs[3], near, far]
    dd = Deduplicator(DedupConfig(), hasher.bands)
    verdicts = [dd.check(exact_key(t), hasher.band_keys(t)) for t in planted]
    assert verdicts[:150] == [None] * 150  # distinct documents are all kept
    assert verdicts[150:] == ["exact", "near", None]


def test_exact_only_and_near_only(base_docs: list[str], hasher: MinHasher) -> None:
    doc = base_docs[long_doc_index(base_docs, 0)]
    near = near_copy(doc)
    only_exact = Deduplicator(DedupConfig(near=False), hasher.bands)
    assert [only_exact.check(exact_key(t), hasher.band_keys(t)) for t in (doc, doc, near)] == [None, "exact", None]
    only_near = Deduplicator(DedupConfig(exact=False), hasher.bands)
    assert [only_near.check(exact_key(t), hasher.band_keys(t)) for t in (doc, doc, near)] == [None, "near", "near"]


def test_threshold_is_honoured(base_docs: list[str]) -> None:
    """A pair at Jaccard ~0.9 is a duplicate at threshold 0.8 and not at 0.98."""
    doc = base_docs[long_doc_index(base_docs, 30)]
    near = near_copy(doc)
    j = jaccard(doc, near)
    assert 0.85 < j < 0.96, j
    for threshold, expected in ((0.8, "near"), (0.98, None)):
        cfg = DedupConfig(threshold=threshold, exact=False)
        h = MinHasher(cfg)
        dd = Deduplicator(cfg, h.bands)
        assert dd.check(exact_key(doc), h.band_keys(doc)) is None
        assert dd.check(exact_key(near), h.band_keys(near)) == expected, threshold


def test_signature_estimates_jaccard(base_docs: list[str]) -> None:
    """Share of equal MinHash values ~ Jaccard of the shingles (sample=1: all shingles)."""
    h = MinHasher(DedupConfig(sample=1, num_perm=256))
    doc = base_docs[long_doc_index(base_docs, 40)]
    for every in (4, 10, 30):
        other = near_copy(doc, every=every)
        est = float((h.signature(doc) == h.signature(other)).mean())
        assert abs(est - jaccard(doc, other)) < 0.12, (every, est, jaccard(doc, other))


def test_case_insensitive_and_deterministic(hasher: MinHasher) -> None:
    text = "Some Words Here that form a sentence long enough to have several shingles in it."
    assert np.array_equal(hasher.band_keys(text), hasher.band_keys(text.lower()))
    assert np.array_equal(hasher.band_keys(text), MinHasher(DedupConfig()).band_keys(text))
    assert exact_key(text) != exact_key(text.lower())
    assert len(hasher.band_keys("short")) == hasher.bands  # shorter than one shingle


def test_uint64_set_across_merges() -> None:
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**64 - 1, size=5000, dtype=np.uint64, endpoint=True)  # the top bit too
    s = UInt64Set(buffer=64)
    for chunk in np.array_split(keys[:4000], 200):
        s.add(chunk)
    assert len(s) == 4000
    assert len(s._sorted) > 0  # merges happened
    for k in keys[:4000:97]:
        assert s.contains_any(np.array([k], dtype=np.uint64)) and s.contains(int(k))
    for k in keys[4000::97]:
        assert not s.contains_any(np.array([k], dtype=np.uint64)) and not s.contains(int(k))
    extra = int(keys[-3])
    assert s.contains(extra) is False
    s.add([extra])
    assert s.contains(extra) is True
    assert s.nbytes() < 4000 * 8 + 70 * 64 * 17


def test_restore_reproduces_decisions(base_docs: list[str], hasher: MinHasher) -> None:
    docs = base_docs[:30]
    dd = Deduplicator(DedupConfig(), hasher.bands)
    rows = []
    for t in docs:
        e, b = exact_key(t), hasher.band_keys(t)
        assert dd.check(e, b) is None
        rows.append(dd.row(e, b))
    fresh = Deduplicator(DedupConfig(), hasher.bands)
    fresh.restore(np.stack(rows))
    assert fresh.check(exact_key(docs[4]), hasher.band_keys(docs[4])) == "exact"
    near = near_copy(docs[long_doc_index(docs, 0)])
    assert fresh.check(exact_key(near), hasher.band_keys(near)) == "near"


def test_pipeline_counts_planted_duplicates(multi_run) -> None:
    dup = multi_run.manifest["counts"]["duplicates"]
    assert dup == {"exact": multi_run.planted["exact"], "near": multi_run.planted["near"]}


def test_permutations_equal_datasketch() -> None:
    from datasketch import MinHash

    from gpt_dist.data.dedup import affine32_permutations

    for num_perm, seed in ((117, 1), (128, 7)):
        a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
        ours = affine32_permutations(num_perm, seed)
        assert np.array_equal(ours[0], a) and np.array_equal(ours[1], b)
        assert ours[0].dtype == np.uint32 and (ours[0] % 2 == 1).all()


EDGE_TEXTS = ["", "a", "   ", "short text", " x" * 5, "ÄÖÜ ünïcödé Straße " * 50, "word " * 300,
              "\n\n  leading blanks " * 40, "a" * (1 << 20) + " b" * 100, "\t\ttabs\tand\nnewlines " * 30]


@pytest.mark.parametrize("sample", [4, 1])
def test_band_keys_batch_equals_one_by_one(base_docs: list[str], sample: int) -> None:
    """The batched MinHash the workers use gives every document exactly its own band keys,
    whatever its neighbours in the batch (edge cases: empty, no full window, a document
    longer than the 1 MiB shingle limit, non-ASCII, leading blanks)."""
    mh = MinHasher(DedupConfig(sample=sample))
    for group in (base_docs[:120], EDGE_TEXTS, EDGE_TEXTS[::-1], [base_docs[0]] + EDGE_TEXTS + [base_docs[1]],
                  base_docs[120:121]):
        want = np.stack([mh.band_keys(t) for t in group])
        assert np.array_equal(mh.band_keys_batch(group), want)
    assert mh.band_keys_batch([]).shape == (0, mh.bands)
