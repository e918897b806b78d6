"""The output prefix lock: one run per prefix, and it dies with the run's parent process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt_dist.data import indexed
from gpt_dist.data.preprocess import PreprocessConfig, PreprocessError, preprocess
from tests.data_tools.dt_common import PY, ROOT, cli_env

HOLD = """
import fcntl, sys, time
f = open(sys.argv[1], "w")
fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
time.sleep(60)
"""


def _corpus(tmp_path: Path, base_docs: list[str]) -> Path:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in base_docs[:60]), encoding="utf-8")
    return corpus


def _cfg(corpus: Path, sp_dir: Path, prefix: str) -> PreprocessConfig:
    return PreprocessConfig(inputs=[str(corpus)], tokenizer=str(sp_dir), output_prefix=prefix, workers=0,
                            shard_tokens=5_000, progress=False)


def test_second_run_on_a_locked_prefix_refused(tmp_path: Path, sp_dir: Path, base_docs: list[str]) -> None:
    corpus, prefix = _corpus(tmp_path, base_docs), str(tmp_path / "out" / "x")
    Path(prefix).parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, prefix + ".lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(PreprocessError, match="another preprocess run is writing this prefix"):
            preprocess(_cfg(corpus, sp_dir, prefix))
    finally:
        holder.kill()
        holder.wait()
    preprocess(_cfg(corpus, sp_dir, prefix))  # the holder gone, the prefix is free


def test_lock_released_when_the_parent_dies_with_workers_alive(tmp_path: Path, sp_dir: Path,
                                                               base_docs: list[str]) -> None:
    """SIGKILL the parent alone once it writes; its workers (slowed to 5 s a batch) are still
    alive when the same command runs again, which must not be refused: the lock went with the
    parent. (With flock() the workers' inherited descriptor kept it locked.)"""
    corpus, prefix = _corpus(tmp_path, base_docs), str(tmp_path / "out" / "x")
    argv = ["--input", str(corpus), "--tokenizer", str(sp_dir), "--output-prefix", prefix, "--workers", "2",
            "--shard-tokens", "5000", "--batch-docs", "4", "--no-progress"]
    proc = subprocess.Popen([PY, str(ROOT / "tests" / "preprocess_delayed.py"), *argv], cwd=ROOT,
                            env=cli_env(GPT_DIST_TEST_WORKER_DELAY="5"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while not Path(prefix + ".lock").exists() or not _workers(proc.pid):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no worker after 90 s"
            time.sleep(0.05)
        workers = _workers(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)  # the parent only
        proc.wait(timeout=30)
        assert any(_alive(w) for w in workers), "the workers died too early to test anything"
        preprocess(_cfg(corpus, sp_dir, prefix))  # not refused
        assert indexed.list_shards(prefix)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _workers(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False
