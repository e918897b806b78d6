"""One multi-process launch (tests/training/_parallel_worker.py) shared by every test here.

The toy shards are learnable arithmetic sequences mod 499 (499 = end of document), as in
tests/pipeline; the worker's module docstring lists the runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = HERE / "_parallel_worker.py"


def build_shards(prefix: Path, n_docs: int = 300, seed: int = 0) -> Path:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(seed)
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for _ in range(n_docs):
        n = rs.randint(10, 80)
        start, k = rs.randint(0, 499), rs.randint(1, 5)
        toks = [(start + k * i) % 499 for i in range(n)] + [499]
        b.add_document(np.array(toks, dtype=np.uint16), [len(toks)])
    b.finalize(str(prefix) + ".idx")
    return prefix


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together while picking, so never 29500 twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", PYTHONPATH=str(ROOT), PYTHONHASHSEED="0")
    # an in-process ParallelContext of another test leaves its rendezvous in os.environ
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


class Runs:
    """What the worker left in OUT: metrics of each run, the forward/backward dumps."""

    def __init__(self, out: Path, log: str) -> None:
        self.out, self.log = out, log

    def losses(self, name: str) -> list[float]:
        recs = [json.loads(line) for line in (self.out / name / "metrics.jsonl").read_text().splitlines()]
        train = {r["step"]: r["loss"] for r in recs if "loss" in r}
        assert sorted(train) == list(range(1, len(train) + 1)), (name, sorted(train))
        return [train[s] for s in sorted(train)]

    def records(self, name: str) -> list[dict]:
        """The training records (one per step) of a run, in order."""
        recs = [json.loads(line) for line in (self.out / name / "metrics.jsonl").read_text().splitlines()]
        return [r for r in recs if "loss" in r]

    def steps(self, name: str) -> list[int]:
        """The step of every training record in the order logged (a restart shows as a repeat)."""
        recs = [json.loads(line) for line in (self.out / name / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in recs if "loss" in r]

    def val_loss(self, name: str) -> float:
        recs = [json.loads(line) for line in (self.out / name / "metrics.jsonl").read_text().splitlines()]
        return [r["val_loss"] for r in recs if "val_loss" in r][-1]

    def fwd_bwd(self, tag: str) -> dict:
        import torch

        return torch.load(self.out / f"{tag}.pt", weights_only=False)  # written by our worker


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("training")
    data = build_shards(root / "data" / "toy")
    out = root / "out"
    cmd = [sys.executable, str(WORKER), str(out), str(data), str(free_ports(1)[0])]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        raise AssertionError(f"worker timed out after 420 s\n{log[-6000:]}") from None
    errors = sorted(out.glob("error_*.txt"))
    detail = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in errors)
    assert proc.returncode == 0 and not errors and (out / "done").exists(), (
        f"worker rc={proc.returncode} after {time.monotonic() - t0:.0f} s\n{detail}\n{log[-4000:]}")
    return Runs(out, log)
