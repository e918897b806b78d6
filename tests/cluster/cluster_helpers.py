"""Helpers of the launcher tests (tests/cluster): toy shards, a tiny config, a clean
environment, launch commands, metrics. The fixtures are in conftest.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "tests" / "cluster" / "_runner.py"
PY = sys.executable
BIN = Path(PY).parent
VOCAB, EOD = 500, 499
STEPS = 12          # steps of every launcher run
SAVE_INTERVAL = 6   # periodic checkpoints at 6 and 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any launcher's variables."""
    drop = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_", "MASTER_", "TORCHELASTIC_", "GPT_DIST_TEST_",
            "HYDRA_")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(drop) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                     "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    env.update(GPT_DIST_TEST_FAKE_TOKENIZER=f"{VOCAB},{EOD}", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", GPT_DIST_PG_TIMEOUT="300",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(extra)
    return env


def build_toy_shards(out: Path) -> str:
    """400 learnable documents (arithmetic sequences mod 499, EOD 499) as one shard."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    out.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(0)
    builder = IndexedDatasetBuilder(str(out / "toy_00000.bin"), dtype=np.uint16)
    for _ in range(400):
        n = rs.randint(20, 200)
        start, k = rs.randint(0, EOD), rs.randint(1, 5)
        toks = [(start + k * i) % EOD for i in range(n)] + [EOD]
        builder.add_document(np.array(toks, dtype=np.uint16), [len(toks)])
    builder.finalize(str(out / "toy_00000.idx"))
    return str(out / "toy")


def write_config(path: Path, toy: dict[str, str], run_dir: Path, **training: Any) -> Path:
    cfg = {
        "run": {"name": "cluster", "dir": str(run_dir)},
        "model": {"arch": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64, "n_ctx": 64,
                  "vocab_size": VOCAB, "dropout": 0.1, "attn_dropout": 0.1},
        "parallel": {"tp": 1, "pp": 1},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"warmup_steps": 3, "decay": "cosine"},
        "data": {"prefixes": [toy["prefix"]], "tokenizer": toy["tokenizer"], "seq_len": 32},
        "training": {"train_steps": STEPS, "micro_batch_size": 4, "global_batch_size": 8,
                     "precision": "fp32", "device": "cpu", "eval_interval": STEPS,
                     "eval_steps": 1, "deterministic": True, **training},
        "checkpoint": {"save_interval": SAVE_INTERVAL, "keep_last": 3},
        "logging": {"log_interval": 1, "progress_bar": False},
        "deepspeed": {"zero_optimization": {"stage": 1}},
    }
    path.write_text(json.dumps(cfg, indent=1))
    return path


def pretrain_args(config: Path, *sets: str) -> list[str]:
    """``_runner.py launch/pretrain.py --config CONFIG [--set ...]`` (launcher-agnostic)."""
    args = [str(RUNNER), str(ROOT / "launch" / "pretrain.py"), "--config", str(config)]
    if sets:
        args += ["--set", *sets]
    return args


def torchrun_cmd(config: Path, nproc: int = 2, *sets: str) -> list[str]:
    return [str(BIN / "torchrun"), f"--nproc-per-node={nproc}", "--nnodes=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
            "--max-restarts=0", "--monitor-interval=0.5", *pretrain_args(config, *sets)]


def run_logged(cmd: list[str], log: Path, timeout: float, **kw: Any) -> subprocess.CompletedProcess:
    """Run ``cmd`` with stdout+stderr in ``log``; on a timeout kill its process group."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                **kw)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            pytest.fail(f"{cmd[0]} timed out after {timeout} s; log:\n{tail(log)}")
    return subprocess.CompletedProcess(cmd, rc)


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"<no {path}>"


def losses(run_dir: Path) -> dict[int, float]:
    from gpt_dist.training.metrics import read_metrics

    train, _ = read_metrics(run_dir)
    return {step: rec["loss"] for step, rec in sorted(train.items())}


def steps_logged(run_dir: Path) -> int:
    """Newest step in metrics.jsonl so far (0 if none); safe while the run is writing it."""
    try:
        return max(losses(run_dir), default=0)
    except ValueError:  # a half-written line
        return 0


def wait_for(pred, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
