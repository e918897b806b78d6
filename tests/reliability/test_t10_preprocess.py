"""T10: preprocessing robustness - bad input, strict mode, worker count, worker failure.

The corpus (tests/data_tools/dt_common.py ``make_t10_corpus``): 200 valid documents plus
an empty text, malformed JSON, a missing key, invalid UTF-8 bytes, a 2 MB document and a
non-string text (rejected), and a lone surrogate, NUL characters, a BOM on line 1 and
CRLF line endings (cleaned, kept).
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from gpt_dist.data import indexed
from gpt_dist.data.clean import clean_text
from tests.data_tools import dt_common as c


@pytest.fixture(scope="module")
def t10_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("t10")


@pytest.fixture(scope="module")
def base_docs(t10_tmp: Path) -> list[str]:
    return c.make_base_docs(t10_tmp)


@pytest.fixture(scope="module")
def sp_dir(t10_tmp: Path, base_docs: list[str]) -> Path:
    return c.make_sp_dir(t10_tmp, base_docs)


@pytest.fixture(scope="module")
def corpus(t10_tmp: Path, base_docs: list[str]) -> c.T10Corpus:
    return c.make_t10_corpus(t10_tmp, base_docs)


def argv(corpus: c.T10Corpus, sp_dir: Path, prefix: str, *extra: str) -> list[str]:
    return ["--input", str(corpus.path), "--tokenizer", str(sp_dir), "--output-prefix", prefix,
            "--shard-tokens", "40000", "--batch-docs", "16", "--no-progress", *extra]


@pytest.fixture(scope="module")
def lenient(t10_tmp: Path, corpus: c.T10Corpus, sp_dir: Path) -> dict[str, str]:
    """The lenient runs, in-process through the CLI's main(): workers 1, and 2 x 2 partitions."""
    import data_tools.preprocess as cli

    out = {}
    for name, extra in (("w1", ("--workers", "1")), ("w2", ("--workers", "2", "--partitions", "2"))):
        prefix = str(t10_tmp / name / "out")
        assert cli.main(argv(corpus, sp_dir, prefix, *extra)) == 0
        out[name] = prefix
    return out


def test_lenient_rejects_exactly_the_bad_lines(lenient, corpus: c.T10Corpus) -> None:
    rejects = [json.loads(line) for line in Path(lenient["w1"] + ".rejected.jsonl").read_text().splitlines()]
    assert {r["line"]: r["reason"] for r in rejects} == corpus.bad
    assert {r["file"] for r in rejects} == {str(corpus.path)}
    assert all(r["message"] for r in rejects)
    m = json.loads(Path(lenient["w1"] + ".manifest.json").read_text())
    expected_counts: dict[str, int] = {}
    for reason in corpus.bad.values():
        expected_counts[reason] = expected_counts.get(reason, 0) + 1
    assert m["counts"]["rejected"] == expected_counts
    assert m["counts"]["surrogates_replaced"] == corpus.surrogates
    assert m["counts"]["control_chars_removed"] == 3  # the three NULs
    assert m["counts"]["documents"] == len(corpus.valid) == 200


def test_lenient_round_trip_and_counts(lenient, corpus: c.T10Corpus, sp_dir: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from gpt_dist.tokenizer import load_tokenizer

    tok = load_tokenizer(sp_dir)
    docs, n_docs = [], 0
    for s in indexed.list_shards(lenient["w1"]):
        ds = IndexedDataset(s, mmap=True)
        n_docs += len(ds.document_indices) - 1
        docs += [np.array(ds[i]) for i in range(len(ds))]
    assert n_docs == len(docs) == len(corpus.valid)
    for raw, tokens in zip(corpus.valid, docs):
        normalized = clean_text(raw).text
        assert tokens[-1] == tok.eod_id
        assert tok.decode(tokens.tolist()) == tok.decode(tok.encode(normalized)) == normalized
    assert "\ufffd" in tok.decode(docs[7].tolist())  # the lone surrogate, replaced
    assert "\x00" not in tok.decode(docs[9].tolist()) and "\r" not in tok.decode(docs[11].tolist())


def test_workers_2_partitions_2_byte_identical_to_workers_1(lenient) -> None:
    a, b = lenient["w1"], lenient["w2"]
    shards_a, shards_b = indexed.list_shards(a), indexed.list_shards(b)
    assert len(shards_a) == len(shards_b) >= 2
    for sa, sb in zip(shards_a, shards_b):
        for suffix in (".bin", ".idx", ".meta.json"):
            assert Path(sa + suffix).read_bytes() == Path(sb + suffix).read_bytes(), sa + suffix
    assert Path(a + ".rejected.jsonl").read_bytes() == Path(b + ".rejected.jsonl").read_bytes()
    ma, mb = (json.loads(Path(p + ".manifest.json").read_text()) for p in (a, b))
    assert ma["counts"] == mb["counts"] and ma["shards"] == mb["shards"]


@pytest.mark.slow
def test_strict_mode_fails_naming_file_line_and_writes_nothing(t10_tmp: Path, corpus: c.T10Corpus,
                                                              sp_dir: Path) -> None:
    prefix = str(t10_tmp / "strict" / "out")
    t0 = time.time()
    r = c.run_cli("preprocess.py", *argv(corpus, sp_dir, prefix, "--workers", "1", "--strict"), timeout=60)
    assert time.time() - t0 < 60
    assert r.returncode != 0
    assert f"{corpus.path}:{corpus.first_bad}:" in r.stderr and "empty text" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not glob.glob(prefix + "*.bin") and not glob.glob(prefix + "*.idx")
    assert not glob.glob(prefix + "*.tmp")


def _workers(parent: psutil.Process) -> list[psutil.Process]:
    """The pool's forked workers (same command line as the parent; not the resource tracker)."""
    try:
        cmd = parent.cmdline()
        return [p for p in parent.children() if p.cmdline() == cmd]
    except psutil.Error:
        return []


@pytest.mark.slow
def test_sigkill_of_a_worker_fails_the_run_within_60s(t10_tmp: Path, corpus: c.T10Corpus, sp_dir: Path) -> None:
    prefix = str(t10_tmp / "killed" / "out")
    proc = subprocess.Popen(
        [c.PY, str(c.ROOT / "tests" / "preprocess_delayed.py"),
         *argv(corpus, sp_dir, prefix, "--workers", "2"), "--batch-docs", "4"],
        cwd=c.ROOT, env=c.cli_env(GPT_DIST_TEST_WORKER_DELAY="0.5"), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.time() + 90
        while len(workers := _workers(parent)) < 2:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "workers did not start"
            time.sleep(0.05)
        time.sleep(1.0)  # mid-run: batches are being processed
        assert proc.poll() is None
        workers[0].send_signal(signal.SIGKILL)
        killed_at = time.time()
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the parent hung after a worker was SIGKILLed")
        assert time.time() - killed_at < 60
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = proc.stderr.read()
    assert rc != 0
    assert "worker process died" in err and "Traceback" not in err, err
    assert not Path(prefix + ".manifest.json").exists()
    for idx in glob.glob(prefix + "_*.idx"):  # whatever is visible is complete
        indexed.validate_shard(idx[:-4], verify_hash=True, require_sidecar=True)
    try:  # no orphaned worker is left behind
        os.killpg(proc.pid, 0)
        time.sleep(2)
        assert not [p for p in psutil.process_iter(["pid"]) if p.info["pid"] in {w.pid for w in workers}
                    and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    except ProcessLookupError:
        pass
