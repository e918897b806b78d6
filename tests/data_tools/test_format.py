"""Our ``.bin``/``.idx`` writer against megatron-core, the reference and the reader.

``gpt_dist.data.indexed.ShardWriter`` writes the Megatron format by hand, so that
preprocessing does not pay megatron-core's ~5 s package import. These tests hold it to
megatron-core 0.16: the same documents written by ``IndexedDatasetBuilder`` give the same
bytes, and ``IndexedDataset`` / ``GPTDataset`` read every shard we write; and
``data_tools/preprocess.py`` imports neither megatron-core nor torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from gpt_dist.data import indexed
from tests.data_tools.dt_common import ROOT, cli_env

# documents of uneven lengths, an empty one and a one-token one: every pointer case
LENGTHS = [5, 1, 0, 37, 2, 300, 8]


def _docs(dtype: type[np.integer], top: int) -> list[np.ndarray]:
    rs = np.random.RandomState(7)
    return [rs.randint(0, top, size=n).astype(dtype) for n in LENGTHS]


def _ours(prefix: str, docs: list[np.ndarray], vocab: int) -> dict:
    w = indexed.ShardWriter(prefix, vocab_size=vocab, eod_id=0, tokenizer_fingerprint="f")
    for d in docs:
        w.add_document(d)
    meta = w.finalize()
    w.commit()
    return meta


def _megatron(prefix: str, docs: list[np.ndarray], dtype: type[np.integer]) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        b.add_document(d, [len(d)])
    b.finalize(prefix + ".idx")


@pytest.mark.parametrize("vocab,dtype", [(400, np.uint16), (70_000, np.int32)])
def test_bytes_identical_to_megatron_builder(tmp_path: Path, vocab: int, dtype: type[np.integer]) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = _docs(dtype, vocab)
    meta = _ours(str(tmp_path / "ours"), docs, vocab)
    _megatron(str(tmp_path / "ref"), docs, dtype)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes(), ext
    assert meta["max_token_id"] == max(int(d.max()) for d in docs if d.size)
    assert meta["bin_sha256"] == indexed.sha256_file(tmp_path / "ours.bin")  # hashed while writing
    assert meta["idx_sha256"] == indexed.sha256_file(tmp_path / "ours.idx")
    ds = IndexedDataset(str(tmp_path / "ours"), mmap=True)
    assert ds.index.dtype == dtype and len(ds) == len(docs)
    for i, d in enumerate(docs):
        assert np.array_equal(np.array(ds[i]), d)


def test_merge_bytes_identical_to_megatron_add_index(tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = _docs(np.uint16, 400)
    parts = [str(tmp_path / f"part_{k:05d}") for k in range(3)]
    for k, p in enumerate(parts):
        _ours(p, docs[k::3], 400)
    meta = indexed.merge_shards(parts, str(tmp_path / "merged"))
    b = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for p in parts:
        b.add_index(p)
    b.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"merged{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes(), ext
    assert meta["num_documents"] == len(docs) and meta["max_token_id"] == max(int(d.max()) for d in docs if d.size)
    indexed.validate_shard(str(tmp_path / "merged"), verify_hash=True, require_sidecar=True)


def test_cast_never_wraps_ids(tmp_path: Path) -> None:
    w = indexed.ShardWriter(str(tmp_path / "x"), vocab_size=400, eod_id=0, tokenizer_fingerprint="f")
    with pytest.raises(indexed.ShardFormatError, match="check: token dtype"):
        w.add_document(np.array([1, 70_000], dtype=np.int64))  # IndexedDatasetBuilder writes 4464
    w.abort()
    assert not list(tmp_path.iterdir())


def test_scan_max_token_id_of_a_plain_megatron_shard(tmp_path: Path) -> None:
    docs = _docs(np.uint16, 400)
    _megatron(str(tmp_path / "plain"), docs, np.uint16)
    want = max(int(d.max()) for d in docs if d.size)
    assert indexed.scan_max_token_id(str(tmp_path / "plain")) == want
    assert indexed.scan_max_token_id(str(tmp_path / "plain"), chunk_tokens=3) == want  # across chunk borders


def test_preprocessed_shards_read_by_megatron(multi_run, sp_tok, tmp_path: Path) -> None:
    """Every shard the pipeline wrote: IndexedDataset reads the documents, the builder
    writes the same bytes from them, GPTDataset builds samples over all of them, and the
    sidecar's largest id is the real one."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    shards = indexed.list_shards(multi_run.prefix)
    total = 0
    for k, s in enumerate(shards):
        ds = IndexedDataset(s, mmap=True)
        docs = [np.array(ds[i]) for i in range(len(ds))]
        assert all(d[-1] == sp_tok.eod_id for d in docs)
        assert indexed.read_sidecar(s)["max_token_id"] == max(int(d.max()) for d in docs)
        total += sum(len(d) for d in docs)
        ref = str(tmp_path / f"ref{k}")
        _megatron(ref, docs, np.uint16)
        for ext in (".bin", ".idx"):
            assert Path(s + ext).read_bytes() == Path(ref + ext).read_bytes(), (s, ext)
    assert total == multi_run.manifest["counts"]["tokens"]

    class Tok:
        vocab_size, eod, pad = sp_tok.vocab_size, sp_tok.eod_id, -1
        unique_identifiers: ClassVar[dict[str, str]] = {"class": "test_format"}

    cfg = GPTDatasetConfig(random_seed=3, sequence_length=32, blend=(shards, None), split="1,0,0",
                           path_to_cache=None, tokenizer=Tok(), reset_position_ids=False,
                           reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
                           mmap_bin_files=True)
    n = total // 33
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [n, None, None], lambda: True, cfg).build()
    assert len(train) == n
    for i in range(0, n, max(1, n // 50)):
        s = train[i]
        assert s["tokens"].shape == (32,) and int(s["tokens"].max()) < sp_tok.vocab_size


def test_preprocess_imports_neither_megatron_nor_torch(tmp_path: Path, sp_dir: Path, base_docs: list[str]) -> None:
    """A whole run (one worker process) leaves megatron and torch out of the interpreter (and
    tqdm, with --no-progress)."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in base_docs[:40]), encoding="utf-8")
    code = ("import sys\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "from data_tools.preprocess import main\n"
            "rc = main(sys.argv[2:])\n"
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'megatron', 'torch', 'tqdm'})\n"
            "print('LOADED', rc, '[' + ','.join(bad) + ']')\n")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT), "--input", str(corpus), "--tokenizer", str(sp_dir),
                        "--output-prefix", str(tmp_path / "out" / "x"), "--workers", "1", "--no-progress"],
                       check=False, capture_output=True, text=True, timeout=120, cwd=ROOT, env=cli_env())
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last == "LOADED 0 []", last
    assert indexed.list_shards(str(tmp_path / "out" / "x"))


def test_progress_bar_when_asked(tmp_path: Path, sp_dir: Path, base_docs: list[str], capsys) -> None:
    from gpt_dist.data.preprocess import PreprocessConfig, preprocess

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in base_docs[:20]), encoding="utf-8")
    preprocess(PreprocessConfig(inputs=[str(corpus)], tokenizer=str(sp_dir), output_prefix=str(tmp_path / "o" / "x"),
                                workers=0, progress=True))
    assert "preprocess: 100%" in capsys.readouterr().err
