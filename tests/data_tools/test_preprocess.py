"""The preprocessing pipeline end to end (gpt_dist.data.preprocess, data_tools/preprocess.py)."""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from gpt_dist.data import indexed
from gpt_dist.data.preprocess import PreprocessConfig, PreprocessError, preprocess
from tests.data_tools.dt_common import PY, ROOT, cli_env, read_docs, run_cli


def test_shards_read_by_megatron_indexed_dataset(multi_run, sp_tok) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    shards = indexed.list_shards(multi_run.prefix)
    assert len(shards) >= 3  # sharded by token count
    docs = []
    for s in shards:
        ds = IndexedDataset(s, mmap=True)
        assert ds.index.dtype == np.uint16  # vocab 400 fits
        assert len(ds.document_indices) - 1 == len(ds)
        docs += [np.array(ds[i]) for i in range(len(ds))]  # copies: the views die with ds
    assert all(d[-1] == sp_tok.eod_id for d in docs)  # EOD after each document
    assert all(sp_tok.eod_id not in d[:-1] for d in docs)
    # decode(read back) == the cleaned text, in input order
    assert [sp_tok.decode(d.tolist()) for d in docs] == multi_run.expected


def test_sharding_by_token_count(multi_run) -> None:
    limit = multi_run.manifest["settings"]["shard_tokens"]
    shards = indexed.list_shards(multi_run.prefix)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for k, s in enumerate(shards):
        ds = IndexedDataset(s, mmap=True)
        lengths = ds.sequence_lengths.copy()  # a view into the mmap that dies with ds
        total = int(lengths.sum())
        if k < len(shards) - 1:
            # a shard closes at the first document that reaches the limit
            assert total >= limit and total - int(lengths[-1]) < limit, (k, total)
        else:
            assert total <= limit + int(lengths[-1])


def test_gpt_dataset_reads_the_shards(multi_run, sp_tok) -> None:
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    class Tok:
        vocab_size, eod, pad = sp_tok.vocab_size, sp_tok.eod_id, -1
        unique_identifiers: ClassVar[dict[str, str]] = {"class": "test"}

    shards = indexed.list_shards(multi_run.prefix)
    cfg = GPTDatasetConfig(random_seed=1, sequence_length=64, blend=(shards, None), split="1,0,0",
                           path_to_cache=None, tokenizer=Tok(), reset_position_ids=False,
                           reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
                           mmap_bin_files=True)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [200, None, None], lambda: True, cfg).build()
    assert len(train) == 200
    stream = np.concatenate(read_docs(multi_run.prefix))
    assert len(stream) == multi_run.manifest["counts"]["tokens"]
    windows = np.lib.stride_tricks.sliding_window_view(stream, 8)
    eods = 0
    for i in range(200):
        s = train[i]
        tokens = s["tokens"].numpy()
        assert tokens.shape == (64,) and int(tokens.max()) < sp_tok.vocab_size
        assert np.array_equal(tokens[1:], s["labels"].numpy()[:-1])
        eods += int((tokens == sp_tok.eod_id).sum())
        if i % 10 == 0:  # a sample's tokens are a window of some document
            head = tokens[:8]
            if sp_tok.eod_id not in head:
                assert (windows == head).all(axis=1).any(), i
    assert eods > 0


def test_manifest_contents(multi_run, sp_tok) -> None:
    m = multi_run.manifest
    assert m["format"] == "gpt_dist.preprocess" and m["dtype"] == "uint16"
    assert [Path(i["path"]) for i in m["inputs"]] == multi_run.inputs  # glob + dir expanded, sorted
    for entry, path in zip(m["inputs"], multi_run.inputs):
        assert entry["size"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert m["tokenizer"]["fingerprint"] == sp_tok.fingerprint
    assert m["tokenizer"]["eod_id"] == sp_tok.eod_id and m["tokenizer"]["vocab_size"] == sp_tok.vocab_size
    c = m["counts"]
    assert c["documents"] == len(multi_run.expected)
    assert c["records"] == len(multi_run.expected) + sum(multi_run.planted.values())
    docs = read_docs(multi_run.prefix)
    assert c["tokens"] == sum(len(d) for d in docs)
    assert c["text_bytes"] == sum(len(t.encode()) for t in multi_run.expected)
    for entry, s in zip(m["shards"], indexed.list_shards(multi_run.prefix)):
        side = indexed.read_sidecar(s)
        assert entry["prefix"] == Path(s).name
        assert entry["bin_sha256"] == side["bin_sha256"] == hashlib.sha256(Path(s + ".bin").read_bytes()).hexdigest()
        assert side["tokenizer_fingerprint"] == sp_tok.fingerprint
    assert sum(e["num_documents"] for e in m["shards"]) == c["documents"]
    assert m["timing"]["tokens_per_s"] > 0 and m["dedup_memory_bytes"] > 0
    # nothing temporary is left behind
    out_dir = Path(multi_run.prefix).parent
    assert not [p for p in os.listdir(out_dir) if p.endswith((".tmp", ".lock"))]
    assert not Path(multi_run.prefix + ".resume").exists()


def test_token_dtype_cutoff() -> None:
    assert indexed.token_dtype(50_257 + 3) == np.uint16
    assert indexed.token_dtype(65_500) == np.int32
    assert indexed.token_dtype(100_000) == np.int32


def test_rerun_is_a_no_op_and_foreign_prefix_refused(multi_run, sp_dir: Path, dt_tmp: Path) -> None:
    m = multi_run.manifest
    again = preprocess(PreprocessConfig(inputs=[str(p) for p in multi_run.inputs[:2]] + [str(multi_run.inputs[2].parent)],
                                        tokenizer=str(sp_dir), output_prefix=multi_run.prefix, workers=0,
                                        shard_tokens=m["settings"]["shard_tokens"], progress=False))
    assert again.get("already_complete") is True
    with pytest.raises(PreprocessError, match="different command"):
        preprocess(PreprocessConfig(inputs=[str(multi_run.inputs[0])], tokenizer=str(sp_dir),
                                    output_prefix=multi_run.prefix, workers=0, progress=False))


def plain_cfg(corpus: Path, sp_dir: Path, prefix: str, **kw) -> PreprocessConfig:
    return PreprocessConfig(inputs=[str(corpus)], tokenizer=str(sp_dir), output_prefix=prefix, workers=0,
                            shard_tokens=20_000, batch_docs=8, progress=False, **kw)


@pytest.fixture(scope="module")
def plain(dt_tmp: Path, base_docs: list[str], sp_dir: Path) -> tuple[Path, str]:
    """A 120-document corpus and its uninterrupted in-process run (the resume reference)."""
    corpus = dt_tmp / "plain" / "corpus.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in base_docs[:120]))
    prefix = str(dt_tmp / "plain" / "ref" / "out")
    preprocess(plain_cfg(corpus, sp_dir, prefix))
    return corpus, prefix


def shard_bytes(prefix: str) -> list[tuple[bytes, bytes]]:
    return [(Path(s + ".bin").read_bytes(), Path(s + ".idx").read_bytes()) for s in indexed.list_shards(prefix)]


def assert_no_partial_shard_looks_valid(prefix: str) -> int:
    """Every visible shard (.idx present) is complete and valid; returns how many."""
    visible = sorted(glob.glob(glob.escape(prefix) + "_*.idx"))
    for idx in visible:
        indexed.validate_shard(idx[:-4], verify_hash=True, require_sidecar=True)
    return len(visible)


def test_resume_after_interrupt_in_process(plain, sp_dir: Path, dt_tmp: Path, monkeypatch) -> None:
    """Ctrl-C after the third shard: temporary files go, committed shards stay; the re-run
    resumes and gives the same bytes as the uninterrupted run."""
    from gpt_dist.data.preprocess import Preprocessor

    corpus, ref = plain
    prefix = str(dt_tmp / "plain" / "interrupted" / "out")
    real = Preprocessor._close_shard
    closed = []

    def close_then_interrupt(self, end):
        real(self, end)
        closed.append(1)
        if len(closed) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Preprocessor, "_close_shard", close_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        preprocess(plain_cfg(corpus, sp_dir, prefix))
    monkeypatch.undo()
    assert assert_no_partial_shard_looks_valid(prefix) == 3
    assert not glob.glob(glob.escape(prefix) + "*.tmp")
    assert not Path(prefix + ".manifest.json").exists()
    m = preprocess(plain_cfg(corpus, sp_dir, prefix))
    assert m["timing"]["resumed_from_shard"] == 3
    assert shard_bytes(prefix) == shard_bytes(ref)
    ref_m = json.loads(Path(ref + ".manifest.json").read_text())
    assert m["counts"] == ref_m["counts"]


def test_disk_full_is_one_line_and_leaves_no_tmp(plain, sp_dir: Path, dt_tmp: Path, monkeypatch, capsys) -> None:
    import data_tools.preprocess as cli

    corpus, _ = plain
    prefix = str(dt_tmp / "plain" / "full" / "out")
    real = indexed.ShardWriter.add_document
    calls = []

    def add_until_full(self, tokens):
        calls.append(1)
        if len(calls) == 30:
            raise OSError(errno.ENOSPC, "No space left on device", self.prefix + ".bin.tmp")
        real(self, tokens)

    monkeypatch.setattr(indexed.ShardWriter, "add_document", add_until_full)
    rc = cli.main(["--input", str(corpus), "--tokenizer", str(sp_dir), "--output-prefix", prefix,
                   "--workers", "0", "--shard-tokens", "20000", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "No space left on device" in err and ".bin.tmp" in err
    assert len(err.strip().splitlines()) == 1
    assert not glob.glob(glob.escape(prefix) + "*.tmp")
    assert assert_no_partial_shard_looks_valid(prefix) >= 1


def test_cli_errors_are_one_line(dt_tmp: Path, sp_dir: Path, plain) -> None:
    corpus, _ = plain
    blocker = dt_tmp / "a_file"
    blocker.write_text("x")
    bad_tok = dt_tmp / "bad_tok"
    bad_tok.mkdir(exist_ok=True)
    (bad_tok / "tokenizer.model").write_bytes(b"garbage")
    cases = [
        (["--input", dt_tmp / "missing.jsonl", "--tokenizer", sp_dir, "--output-prefix", dt_tmp / "e1" / "o"],
         str(dt_tmp / "missing.jsonl")),
        (["--input", str(dt_tmp / "nothing_*.jsonl"), "--tokenizer", sp_dir, "--output-prefix", dt_tmp / "e2" / "o"],
         "nothing_*.jsonl"),
        (["--input", corpus, "--tokenizer", bad_tok, "--output-prefix", dt_tmp / "e3" / "o"], str(bad_tok)),
        (["--input", corpus, "--tokenizer", dt_tmp / "no_tok", "--output-prefix", dt_tmp / "e4" / "o"],
         str(dt_tmp / "no_tok")),
        (["--input", corpus, "--tokenizer", sp_dir, "--output-prefix", blocker / "sub" / "o"], str(blocker)),
    ]
    for args, named in cases:
        r = run_cli("preprocess.py", *map(str, args), "--workers", "1", timeout=60)
        assert r.returncode != 0, args
        assert "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert named in r.stderr, (named, r.stderr)


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_shards(plain, sp_dir: Path, dt_tmp: Path) -> None:
    """SIGKILL the whole process group once the first shard is visible; re-running the
    same command finishes the job with the bytes of an uninterrupted run."""
    import data_tools.preprocess as cli

    corpus, ref = plain
    prefix = str(dt_tmp / "plain" / "killed" / "out")
    argv = ["--input", str(corpus), "--tokenizer", str(sp_dir), "--output-prefix", prefix, "--workers", "2",
            "--shard-tokens", "20000", "--batch-docs", "8", "--no-progress"]
    proc = subprocess.Popen([PY, str(ROOT / "tests" / "preprocess_delayed.py"), *argv], cwd=ROOT,
                            env=cli_env(GPT_DIST_TEST_WORKER_DELAY="0.4"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while not os.path.exists(indexed.shard_prefix(prefix, 0) + ".idx"):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no shard after 90 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    n_ref = len(indexed.list_shards(ref))
    visible = assert_no_partial_shard_looks_valid(prefix)
    assert 1 <= visible < n_ref
    assert not Path(prefix + ".manifest.json").exists()
    assert cli.main(argv[:-5] + ["--workers", "1", "--shard-tokens", "20000", "--batch-docs", "8", "--no-progress"]) == 0
    m = json.loads(Path(prefix + ".manifest.json").read_text())
    assert m["timing"]["resumed_from_shard"] >= 1
    assert shard_bytes(prefix) == shard_bytes(ref)
    assert not glob.glob(glob.escape(prefix) + "*.tmp")


def test_strict_bad_line_after_complete_shards_leaves_nothing(plain, sp_dir: Path, dt_tmp: Path) -> None:
    """Strict mode holds every finished shard back until the end: a bad last line leaves
    no .bin/.idx at all (the fast path, a bad line in the first batch, is T10's)."""
    corpus, _ = plain
    bad = dt_tmp / "plain" / "strict_late.jsonl"
    lines = corpus.read_text().splitlines()
    bad.write_text("\n".join(lines) + '\n{"text": 3}\n')
    prefix = str(dt_tmp / "plain" / "strict_late" / "out")
    with pytest.raises(PreprocessError, match=f"{bad}:{len(lines) + 1}: 'text' is int"):
        preprocess(plain_cfg(bad, sp_dir, prefix, strict=True))
    left = os.listdir(Path(prefix).parent)
    assert not [p for p in left if p.endswith((".bin", ".idx", ".tmp", ".meta.json"))], left


def test_truncated_gzip_and_text_bom(base_docs: list[str], sp_dir: Path, dt_tmp: Path, sp_tok) -> None:
    """A corrupt .gz keeps the documents before the damage and rejects the rest of that
    file; a text file's BOM is dropped; the other inputs are unaffected."""
    import gzip

    src = dt_tmp / "gz_cases"
    src.mkdir()
    docs = base_docs[150:170]
    blob = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in docs).encode())
    (src / "a_truncated.jsonl.gz").write_bytes(blob[: len(blob) * 2 // 3])
    (src / "b.txt").write_bytes(b"\xef\xbb\xbf" + base_docs[170].encode())
    prefix = str(dt_tmp / "gz_cases_out" / "out")
    m = preprocess(PreprocessConfig(inputs=[str(src)], tokenizer=str(sp_dir), output_prefix=prefix,
                                    workers=0, progress=False))
    rejects = [json.loads(x) for x in Path(prefix + ".rejected.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == ["unreadable"]
    assert rejects[0]["file"].endswith("a_truncated.jsonl.gz")
    decoded = [sp_tok.decode(d.tolist()) for d in read_docs(prefix)]
    n_ok = len(decoded) - 1
    assert 0 < n_ok < len(docs)
    assert decoded[:n_ok] == docs[:n_ok]  # every complete line before the damage is kept
    assert decoded[-1] == base_docs[170]  # BOM dropped, text kept
    assert m["counts"]["documents"] == len(decoded)
