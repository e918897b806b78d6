"""T11: .idx/.bin integrity (gpt_dist.data.indexed) and index-cache keys.

Every damage of the matrix is rejected when the shard is *opened* (open_indexed, before
megatron-core's IndexedDataset exists), with a ShardFormatError naming the check, also
under ``python -O``. The sidecar records the .bin length and sha256; merge refuses mixed
dtypes and otherwise equals the concatenation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt_dist.data import indexed
from tests.data_tools import dt_common as c


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """(work dir, output prefix, tokenizer dir): 40 documents in 5 uint16 shards."""
    from tests.toy_data import build_tiny_corpus_and_shards

    work = tmp_path_factory.mktemp("t11")
    prefix, tok = build_tiny_corpus_and_shards(work / "build", n_docs=40, vocab_size=400, shard_tokens=25_000)
    return work, prefix, tok


def smallest_and_largest(prefix: str) -> tuple[str, str]:
    shards = sorted(indexed.list_shards(prefix), key=lambda s: Path(s + ".bin").stat().st_size)
    return shards[0], shards[-1]


def test_clean_shards_open(tiny) -> None:
    _, prefix, _ = tiny
    shards = indexed.list_shards(prefix)
    assert len(shards) >= 3
    for s in shards:
        info = indexed.validate_shard(s, verify_hash=True, require_sidecar=True)
        assert info["dtype"] == "uint16"
        side = info["sidecar"]
        assert side["bin_bytes"] == Path(s + ".bin").stat().st_size
        assert side["bin_sha256"] == indexed.sha256_file(s + ".bin")
        ds = indexed.open_indexed(s, verify_hash=True)
        assert len(ds.document_indices) - 1 == side["num_documents"] == len(ds)


@pytest.mark.parametrize("case", sorted(c.MUTATION_CHECKS))
def test_damage_rejected_at_open(tiny, case: str) -> None:
    work, prefix, _ = tiny
    p = c.copy_shards(prefix, work / f"m_{case}")
    small, large = smallest_and_largest(p)
    c.mutate(small, case, other=large)
    with pytest.raises(indexed.ShardFormatError, match=f"check: {c.MUTATION_CHECKS[case]}") as e:
        indexed.open_indexed(small)
    assert small in str(e.value)
    # the untouched neighbours still open
    indexed.open_indexed(large)


def test_same_size_edit_caught_by_hash(tiny) -> None:
    work, prefix, _ = tiny
    p = c.copy_shards(prefix, work / "m_hash")
    small, _ = smallest_and_largest(p)
    c.mutate(small, "edit_token")
    indexed.open_indexed(small)  # lengths agree: the cheap open accepts it
    with pytest.raises(indexed.ShardFormatError, match="check: sha256"):
        indexed.open_indexed(small, verify_hash=True)


def test_stale_bin_without_sidecar_needs_the_sidecar(tiny) -> None:
    """A shard from another tool (no sidecar) still gets the structural checks."""
    work, prefix, _ = tiny
    p = c.copy_shards(prefix, work / "m_nosidecar")
    small, large = smallest_and_largest(p)
    indexed.sidecar_path(small).unlink()
    indexed.open_indexed(small)
    with pytest.raises(indexed.ShardFormatError, match="check: sidecar present"):
        indexed.open_indexed(small, require_sidecar=True)
    c.mutate(small, "swap_bin", other=large)
    with pytest.raises(indexed.ShardFormatError, match="check: bin size"):
        indexed.open_indexed(small)


def test_checks_run_under_python_O(tiny) -> None:
    work, prefix, _ = tiny
    targets = {}
    for case in c.MUTATION_CHECKS:
        p = c.copy_shards(prefix, work / f"O_{case}")
        small, large = smallest_and_largest(p)
        c.mutate(small, case, other=large)
        targets[case] = small
    script = (
        "import json, sys\n"
        "assert sys.flags.optimize == 1 and not __debug__\n"
        "from gpt_dist.data.indexed import ShardFormatError, validate_shard\n"
        "out = {}\n"
        "for case, prefix in json.loads(sys.argv[1]).items():\n"
        "    try:\n"
        "        validate_shard(prefix)\n"
        "        out[case] = 'accepted'\n"
        "    except ShardFormatError as exc:\n"
        "        out[case] = str(exc)\n"
        "print(json.dumps(out))\n")
    r = subprocess.run([sys.executable, "-O", "-c", script, json.dumps(targets)], cwd=c.ROOT, env=c.cli_env(),
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for case, check in c.MUTATION_CHECKS.items():
        assert f"check: {check}" in out[case], (case, out[case])


def test_missing_shard_detected(tiny) -> None:
    work, prefix, _ = tiny
    p = c.copy_shards(prefix, work / "m_missing")
    for suffix in (".bin", ".idx", ".meta.json"):
        Path(indexed.shard_prefix(p, 1) + suffix).unlink()
    with pytest.raises(indexed.ShardFormatError, match="check: shards contiguous"):
        indexed.list_shards(p)
    last = len(json.loads(Path(p + ".manifest.json").read_text())["shards"]) - 1
    q = c.copy_shards(prefix, work / "m_missing_last")
    for suffix in (".bin", ".idx", ".meta.json"):
        Path(indexed.shard_prefix(q, last) + suffix).unlink()
    with pytest.raises(indexed.ShardFormatError, match="check: shards vs manifest"):
        indexed.list_shards(q)


def _int32_shard(prefix: str, fingerprint: str) -> None:
    w = indexed.ShardWriter(prefix, vocab_size=70_000, eod_id=0, tokenizer_fingerprint=fingerprint)
    for n in (3, 5, 2):
        w.add_document(np.arange(1, n + 1, dtype=np.int32) * 1000)
    w.finalize()
    w.commit()


def test_merge_equals_concatenation_and_refuses_mixed_dtypes(tiny) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    work, prefix, _ = tiny
    shards = indexed.list_shards(prefix)[:3]
    out = str(work / "merged" / "all")
    Path(out).parent.mkdir()
    meta = indexed.merge_shards(shards, out)
    merged = indexed.open_indexed(out, verify_hash=True, require_sidecar=True)
    parts = [IndexedDataset(s, mmap=True) for s in shards]
    want_docs = [np.array(ds[i]) for ds in parts for i in range(len(ds))]
    assert len(merged) == len(want_docs) == meta["num_documents"]
    for i, doc in enumerate(want_docs):
        assert np.array_equal(np.array(merged[i]), doc)
    offsets = np.cumsum([0] + [len(ds) for ds in parts])
    want_idx = np.concatenate([[0]] + [ds.document_indices[1:] + off for ds, off in zip(parts, offsets)])
    assert np.array_equal(merged.document_indices, want_idx)
    fp = indexed.read_sidecar(shards[0])["tokenizer_fingerprint"]
    wide = str(work / "merged" / "wide_00000")
    _int32_shard(wide, fp)
    assert indexed.validate_shard(wide)["dtype"] == "int32"
    with pytest.raises(indexed.ShardFormatError, match="check: merge dtype"):
        indexed.merge_shards([shards[0], wide], str(work / "merged" / "mixed"))
    assert not list((work / "merged").glob("mixed*"))


def test_index_cache_key_follows_shard_content(tiny) -> None:
    work, prefix, _ = tiny
    p = c.copy_shards(prefix, work / "cache_key")
    shards = indexed.list_shards(p)
    base = {"seq_len": 64, "seed": 1, "num_samples": 100, "split": "98,2,0"}
    key = indexed.index_cache_key(shards, **base)
    assert key == indexed.index_cache_key(list(shards), **base)  # deterministic
    for change in ({"seq_len": 128}, {"seed": 2}, {"num_samples": 101}, {"split": "90,10,0"}):
        assert indexed.index_cache_key(shards, **{**base, **change}) != key, change
    assert indexed.index_cache_key(shards[:-1], **base) != key
    # rewrite one shard's content (same prefix, new tokens) -> new sidecar hash -> new key
    small, _ = smallest_and_largest(p)
    indexed.remove_shard_files(small)
    w = indexed.ShardWriter(small, vocab_size=400, eod_id=1, tokenizer_fingerprint="x")
    w.add_document(np.array([5, 6, 1], dtype=np.uint16))
    w.finalize()
    w.commit()
    assert indexed.index_cache_key(shards, **base) != key
