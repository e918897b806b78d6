"""Launch 2-rank torchrun jobs for the reliability suite and read what they logged.

Rules from RELIABILITY.md section 5: ``torchrun --standalone --max-restarts=N
--monitor-interval=0.5``; ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (stale shared TCPStore
after a restart, pytorch #135712), ``OMP_NUM_THREADS=1``, ``DS_ACCELERATOR=cpu``,
``PYTHONHASHSEED=0``; every job in its own session with a hard timeout, the whole group
killed on timeout, and no process of the session left alive afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tests import helpers
from tests.helpers import PY, ROOT, Result, copy_checkpoint  # noqa: F401 - the suite's names for them

RUNNER = Path(__file__).resolve().parent / "_runner.py"
VOCAB, EOD = helpers.VOCAB, helpers.EOD

#: The tiny model every integration test trains (dropout > 0 so the RNG restore matters):
#: configs/tiny_cpu.json with these changes (tests/helpers.py ``toy_config_dict``);
#: ``make_config`` points data.tokenizer at the toy tokenizer, which wrote the toy shards.
BASE_CONFIG: dict[str, Any] = helpers.toy_config_dict(
    "RUN_DIR", ["DATA"], tokenizer="",
    run={"name": "rel"},
    model={"n_layer": 2, "n_head": 2, "n_embd": 32, "n_ctx": 32, "vocab_size": VOCAB,
           "make_vocab_size_divisible_by": 4},
    schedule={"warmup_steps": 3, "decay_steps": 16},
    data={"seq_len": 16, "split": "90,10,0"},
    training={"train_steps": 16, "micro_batch_size": 4, "global_batch_size": 8, "eval_interval": 1000,
              "eval_steps": 1, "seed": 1234},
    checkpoint={"save_interval": 5},
    logging={"log_interval": 1000, "tensorboard": False},
)


def build_shards(prefix: Path, n_docs: int = 300, seed: int = 0) -> Path:
    """Toy token shards: learnable arithmetic sequences mod VOCAB-1, each ended by EOD."""
    return helpers.toy_shards(prefix, n_docs=n_docs, lengths=(10, 80), seed=seed)


def make_config(path: Path, run_dir: Path, data: Path, **overrides: Any) -> Path:
    """Write BASE_CONFIG with ``section__key=value`` overrides (e.g. training__train_steps=8)
    or ``section={...}`` replacing a whole section."""
    cfg = helpers.make_config(BASE_CONFIG, run_dir, [data], **overrides)
    cfg["data"]["tokenizer"] = cfg["data"]["tokenizer"] or str(helpers.toy_tokenizer())
    return helpers.write_config(path, cfg)


def base_env(**extra: str) -> dict[str, str]:
    return helpers.child_env(**extra)


def torchrun(config: Path, run_dir: Path, *, nproc: int = 2, max_restarts: int = 0,
             timeout: float = 240, env: dict[str, str] | None = None,
             extra_args: tuple[str, ...] = ()) -> Result:
    """Run ``torchrun`` on the runner; kill the whole session on timeout; no survivors."""
    cmd = helpers.torchrun_cmd(RUNNER, config, *extra_args, nproc=nproc, max_restarts=max_restarts)
    res = helpers.run(cmd, timeout=timeout, env=base_env(**(env or {})), run_dir=run_dir)
    res.env = env or {}
    res.restarts = count_restarts(run_dir)
    return res


def count_restarts(run_dir: Path) -> int:
    """Worker-group restarts torchrun performed (from the runner's attempts.log)."""
    path = Path(run_dir) / "attempts.log"
    if not path.exists():
        return 0
    return max(int(line.split()[0]) for line in path.read_text().splitlines() if line.strip())


def python_single(config: Path, run_dir: Path, *, timeout: float = 120,
                  env: dict[str, str] | None = None) -> Result:
    """A one-process run without torchrun (RANK=0, WORLD_SIZE=1)."""
    full_env = base_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(helpers.free_port()), **(env or {}))
    return helpers.run(helpers.python_cmd(RUNNER, config), timeout=timeout, env=full_env, run_dir=run_dir)


# --------------------------------------------------------------------------- reading results


def metrics(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Per-step records; the last record for a step wins (as after a restart)."""
    from gpt_dist.training.metrics import read_metrics

    return read_metrics(run_dir)[0]


def all_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every training record in write order (both attempts of a restarted run)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


COMPARED = ("loss", "grad_norm", "lr", "skipped", "consumed_samples", "samples_sha", "state_sha")


def diff_runs(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]],
              steps: list[int] | None = None, keys: tuple[str, ...] = COMPARED) -> list[str]:
    """Exact differences between two runs' records (key sets first, then values with ==).

    Nothing to compare is a difference too: no steps, or a step with none of ``keys``."""
    out = []
    steps = steps if steps is not None else sorted(set(a) | set(b))
    if not steps:
        return ["no steps to compare"]
    for s in steps:
        if s not in a or s not in b:
            out.append(f"step {s}: missing in {'first' if s not in a else 'second'} run")
            continue
        ka, kb = set(a[s]) & set(keys), set(b[s]) & set(keys)
        if ka != kb:
            out.append(f"step {s}: logged keys differ: {sorted(ka ^ kb)}")
            continue
        if not ka:
            out.append(f"step {s}: none of {keys} logged")
            continue
        for k in sorted(ka):
            if a[s][k] != b[s][k]:
                out.append(f"step {s}: {k} {a[s][k]!r} != {b[s][k]!r}")
    return out


def same_objects(a, b, where: str) -> int:
    """Assert two loaded checkpoint objects equal (tensors bit for bit); count the tensors."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        return sum(same_objects(a[k], b[k], f"{where}.{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        return sum(same_objects(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
        return 1
    if isinstance(a, (int, float, str, bool, type(None))):
        assert a == b, f"{where}: {a!r} != {b!r}"
    return 0
