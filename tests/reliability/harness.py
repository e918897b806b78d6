"""Launch 2-rank torchrun jobs for the reliability suite and read what they logged.

Rules from RELIABILITY.md section 5: ``torchrun --standalone --max-restarts=N
--monitor-interval=0.5``; ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (stale shared TCPStore
after a restart, pytorch #135712), ``OMP_NUM_THREADS=1``, ``DS_ACCELERATOR=cpu``,
``PYTHONHASHSEED=0``; every job in its own session with a hard timeout, the whole group
killed on timeout, and no process of the session left alive afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).resolve().parent / "_runner.py"
PY = sys.executable
VOCAB, EOD = 500, 499

#: The tiny model every integration test trains (dropout > 0 so the RNG restore matters).
BASE_CONFIG: dict[str, Any] = {
    "run": {"name": "rel", "dir": "RUN_DIR"},
    "model": {"arch": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_ctx": 32,
              "vocab_size": VOCAB, "make_vocab_size_divisible_by": 4, "dropout": 0.1, "attn_dropout": 0.1},
    "parallel": {"tp": 1, "pp": 1},
    "optimizer": {"lr": 3e-3, "weight_decay": 0.01},
    "schedule": {"warmup_steps": 3, "decay": "cosine", "decay_steps": 16},
    "data": {"prefixes": ["DATA"], "tokenizer": "", "seq_len": 16, "split": "90,10,0"},
    "training": {"train_steps": 16, "micro_batch_size": 4, "global_batch_size": 8,
                 "precision": "fp32", "device": "cpu", "eval_interval": 1000, "eval_steps": 1,
                 "deterministic": True, "seed": 1234},
    "checkpoint": {"save_interval": 5, "keep_last": 2},
    "logging": {"log_interval": 1000, "progress_bar": False, "tensorboard": False},
    "deepspeed": {"zero_optimization": {"stage": 1}},
}


def build_shards(prefix: Path, n_docs: int = 300, seed: int = 0) -> Path:
    """Toy token shards: learnable arithmetic sequences mod VOCAB-1, each ended by EOD."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(seed)
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for _ in range(n_docs):
        n = rs.randint(10, 80)
        start, k = rs.randint(0, EOD), rs.randint(1, 5)
        toks = [(start + k * i) % EOD for i in range(n)] + [EOD]
        b.add_document(np.array(toks, dtype=np.uint16), [len(toks)])
    b.finalize(str(prefix) + ".idx")
    return prefix


def make_config(path: Path, run_dir: Path, data: Path, **overrides: Any) -> Path:
    """Write BASE_CONFIG with ``section__key=value`` overrides (e.g. training__train_steps=8)
    or ``section={...}`` replacing a whole section."""
    cfg = json.loads(json.dumps(BASE_CONFIG))
    cfg["run"]["dir"] = str(run_dir)
    cfg["data"]["prefixes"] = [str(data)]
    for key, value in overrides.items():
        if "__" not in key:  # a whole section
            cfg[key] = value
            continue
        section, name = key.split("__", 1)
        cfg[section][name] = value
    path.write_text(json.dumps(cfg, indent=1))
    return path


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    wall_s: float
    run_dir: Path
    restarts: int = 0
    env: dict[str, str] = field(default_factory=dict)
    end_time: float = field(default_factory=time.time)  # wall clock when the job had exited

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self) -> str:
        return f"rc={self.rc} after {self.wall_s:.1f}s\n--- output tail ---\n{self.output[-6000:]}"


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GPT_DIST_TEST_", "TORCHELASTIC_", "MASTER_", "SLURM_", "OMPI_", "PMI_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GPT_DIST_TRUST_CHECKPOINT")}
    env.update(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", PYTHONHASHSEED="0", CUDA_VISIBLE_DEVICES="",
               GPT_DIST_PG_TIMEOUT="60", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _session_pids(sid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: session id
            out.append(int(d.name))
    return out


def torchrun(config: Path, run_dir: Path, *, nproc: int = 2, max_restarts: int = 0,
             timeout: float = 240, env: dict[str, str] | None = None,
             extra_args: tuple[str, ...] = ()) -> Result:
    """Run ``torchrun`` on the runner; kill the whole session on timeout; no survivors."""
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.5", str(RUNNER), str(config),
           *extra_args]
    full_env = base_env(**(env or {}))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun timed out after {timeout}s and was killed\n{(out + err)[-6000:]}")
    finally:
        _reap_session(proc.pid)
    res = Result(proc.returncode, out, err, time.monotonic() - t0, run_dir, env=env or {})
    res.restarts = count_restarts(run_dir)
    return res


def _reap_session(sid: int) -> None:
    """Kill what is left of the session; fail if something survived."""
    left = _session_pids(sid)
    if not left:
        return
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 5
    while _session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    raise AssertionError(f"processes of the job's session survived its exit: {left}")


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
                        MASTER_PORT=str(_free_port()), **(env or {}))
    t0 = time.monotonic()
    proc = subprocess.Popen([PY, str(RUNNER), str(config)], cwd=str(ROOT), env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"run timed out after {timeout}s\n{(out + err)[-6000:]}")
    finally:
        _reap_session(proc.pid)
    return Result(proc.returncode, out, err, time.monotonic() - t0, run_dir)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    """Exact differences between two runs' records (key sets first, then values with ==)."""
    out = []
    steps = steps if steps is not None else sorted(set(a) | set(b))
    for s in steps:
        if s not in a or s not in b:
            out.append(f"step {s}: missing in {'first' if s not in a else 'second'} run")
            continue
        ka, kb = set(a[s]) & set(keys), set(b[s]) & set(keys)
        if ka != kb:
            out.append(f"step {s}: logged keys differ: {sorted(ka ^ kb)}")
            continue
        for k in sorted(ka):
            if a[s][k] != b[s][k]:
                out.append(f"step {s}: {k} {a[s][k]!r} != {b[s][k]!r}")
    return out


def copy_checkpoint(src_run: Path, dst_run: Path, tag: str) -> Path:
    """Copy one committed checkpoint (and the run's manifest key) into a fresh run dir."""
    import shutil

    src, dst = Path(src_run) / "checkpoints", Path(dst_run) / "checkpoints"
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / tag, dst / tag)
    for name in (".manifest_key",):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    (dst / "latest").write_text(tag)
    return dst / tag
