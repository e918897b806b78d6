"""Helpers of the launcher tests (tests/cluster): toy shards, a tiny config, a clean
environment, launch commands, metrics. The fixtures are in conftest.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests import helpers
from tests.helpers import BIN, EOD, PY, ROOT, VOCAB, free_port, tail  # noqa: F401 - re-exported

RUNNER = ROOT / "tests" / "cluster" / "_runner.py"
STEPS = 12          # steps of every launcher run
SAVE_INTERVAL = 6   # periodic checkpoints at 6 and 12


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any launcher's variables (tests/helpers.py
    ``child_env``) and a 300 s collective timeout."""
    env = helpers.child_env(GPT_DIST_PG_TIMEOUT="300")
    env.update(extra)
    return env


def build_toy_shards(out: Path) -> str:
    """400 learnable documents (arithmetic sequences mod 499, EOD 499) as one shard, written
    by the toy tokenizer (tests/toy_data.py)."""
    helpers.toy_shards(out / "toy_00000", n_docs=400, lengths=(20, 200), seed=0)
    return str(out / "toy")


def write_config(path: Path, toy: dict[str, str], run_dir: Path, **training: Any) -> Path:
    """The launcher runs' toy config: configs/tiny_cpu.json with these changes
    (tests/helpers.py ``toy_config_dict``), ``training`` keys on top."""
    cfg = helpers.toy_config_dict(
        run_dir, [toy["prefix"]], tokenizer=toy["tokenizer"],
        run={"name": "cluster"},
        model={"n_layer": 2, "n_embd": 64, "n_ctx": 64, "vocab_size": VOCAB},
        schedule={"warmup_steps": 3},
        data={"seq_len": 32},
        training={"train_steps": STEPS, "micro_batch_size": 4, "global_batch_size": 8, "eval_interval": STEPS,
                  "eval_steps": 1, **training},
        checkpoint={"save_interval": SAVE_INTERVAL, "keep_last": 3},
        logging={"log_interval": 1},
    )
    return helpers.write_config(path, cfg)


def pretrain_args(config: Path, *sets: str) -> list[str]:
    """``_runner.py launch/pretrain.py --config CONFIG [--set ...]`` (launcher-agnostic)."""
    args = [str(RUNNER), str(ROOT / "launch" / "pretrain.py"), "--config", str(config)]
    if sets:
        args += ["--set", *sets]
    return args


def torchrun_cmd(config: Path, nproc: int = 2, *sets: str) -> list[str]:
    return helpers.torchrun_cmd(*pretrain_args(config, *sets), nproc=nproc)


def run_logged(cmd: list[str], log: Path, timeout: float, **kw: Any) -> helpers.Result:
    """Run ``cmd`` with stdout+stderr in ``log`` (tests/helpers.py ``run``: own session,
    killed on a timeout, no survivors)."""
    try:
        return helpers.run(cmd, timeout=timeout, log=log, **kw)
    except AssertionError as exc:
        pytest.fail(f"{exc}\nlog:\n{tail(log)}")


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
