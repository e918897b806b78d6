"""Toy shards, the toy run config, the runner and torchrun for the pipeline tests (CPU, gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import helpers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


#: the pipeline runs' toy config: configs/tiny_cpu.json with these changes (tests/helpers.py)
TOY = {
    "run": {"name": "pipe"},
    "model": {"n_layer": 2, "n_embd": 32, "n_ctx": 32, "vocab_size": 500, "dropout": 0.0, "attn_dropout": 0.0},
    "schedule": {"warmup_steps": 3},
    "data": {"seq_len": 16},
    "training": {"train_steps": 10, "micro_batch_size": 2, "global_batch_size": 8, "eval_interval": 10,
                 "eval_steps": 1},
    "checkpoint": {"save_interval": 5},
    "logging": {"log_interval": 1},
}


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """One shard of learnable documents (arithmetic sequences mod 499, 499 = end of doc),
    written by the toy tokenizer, and ``base.json``: the toy config (tokenizer included)."""
    root = tmp_path_factory.mktemp("pipe_data")
    helpers.toy_shards(root / "toy_00000", n_docs=300, lengths=(20, 120), seed=0)
    helpers.write_config(root / "base.json", helpers.toy_config_dict("UNSET", ["UNSET"], **TOY))
    return root


@pytest.fixture(scope="session")
def base_json(toy_data) -> Path:
    return toy_data / "base.json"


def overrides(toy_data: Path, run_dir: Path, **kv) -> list[str]:
    """The runner's arguments: the toy config, then ``key=value`` overrides."""
    base = {"run.dir": str(run_dir), "data.prefixes": json.dumps([str(toy_data / "toy")])}
    base.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in kv.items()})
    return [str(toy_data / "base.json"), *(f"{k}={v}" for k, v in base.items())]


def launch(nproc: int, args: list[str], *, env: dict[str, str] | None = None,
           max_restarts: int = 0, timeout: int = 400,
           log_to: str | Path | None = None) -> helpers.Result:
    """tests/pipeline/run.py ARGS (``overrides``: the config and its overrides) under torchrun
    (or plain python for 1 process), launched by tests/helpers.py (own session, hard
    timeout, no survivors)."""
    script = [HERE / "run.py", *args]
    if nproc == 1 and not max_restarts:
        cmd = helpers.python_cmd(*script)
    else:
        cmd = helpers.torchrun_cmd(*script, nproc=nproc, max_restarts=max_restarts)
    # the library's collective timeout (1800 s): the hard timeout ends a hang first
    proc = helpers.run(cmd, env=helpers.child_env(GPT_DIST_PG_TIMEOUT="1800", **(env or {})), timeout=timeout)
    if log_to is not None:
        log = Path(log_to)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + "\n----- stderr -----\n" + proc.stderr)
    assert proc.rc == 0, f"{' '.join(cmd)} -> rc {proc.rc}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def metrics(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(train loss by step, val loss by step); a restarted run's later lines win."""
    train, val = {}, {}
    for rec in helpers.metrics_records(run_dir):
        if "loss" in rec:
            train[rec["step"]] = rec["loss"]
        if "val_loss" in rec:
            val[rec["step"]] = rec["val_loss"]
    return train, val
