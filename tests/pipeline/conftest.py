"""Toy shards, the runner and torchrun for the pipeline tests (CPU, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """One shard of learnable documents (arithmetic sequences mod 499, 499 = end of doc)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = tmp_path_factory.mktemp("pipe_data")
    rs = np.random.RandomState(0)
    builder = IndexedDatasetBuilder(str(root / "toy_00000.bin"), dtype=np.uint16)
    for _ in range(300):
        n = rs.randint(20, 120)
        start, step = rs.randint(0, 499), rs.randint(1, 5)
        toks = [(start + step * i) % 499 for i in range(n)] + [499]
        builder.add_document(np.array(toks, dtype=np.uint16), [len(toks)])
    builder.finalize(str(root / "toy_00000.idx"))
    (root / "tok").mkdir()
    return root


def overrides(toy_data: Path, run_dir: Path, **kv) -> list[str]:
    base = {"run.dir": str(run_dir), "data.prefixes": json.dumps([str(toy_data / "toy")]),
            "data.tokenizer": str(toy_data / "tok")}
    base.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in kv.items()})
    return [f"{k}={v}" for k, v in base.items()]


def launch(nproc: int, args: list[str], *, env: dict[str, str] | None = None,
           max_restarts: int = 0, timeout: int = 400,
           log_to: str | Path | None = None) -> subprocess.CompletedProcess:
    """tests/pipeline/run.py base.json ARGS under torchrun (or plain python for 1 process)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
             DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), **(env or {}))
    # an in-process ParallelContext of another test (tests/export) leaves its RANK/MASTER_PORT
    # in os.environ; a child must pick its own rendezvous
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    script = [str(HERE / "run.py"), str(HERE / "base.json"), *args]
    if nproc == 1 and not max_restarts:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}", *script]
    proc = subprocess.run(cmd, env=e, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    log = Path(log_to) if log_to else None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + "\n----- stderr -----\n" + proc.stderr)
    assert proc.returncode == 0, f"{' '.join(cmd)} -> rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def metrics(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(train loss by step, val loss by step); a restarted run's later lines win."""
    train, val = {}, {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            train[rec["step"]] = rec["loss"]
        if "val_loss" in rec:
            val[rec["step"]] = rec["val_loss"]
    return train, val
