"""What every test directory shares: toy data (tests/toy_data.py), the toy run config, ZeRO-3
settings, one way to launch a process (python, torchrun, mpirun, a batch script) under
supervision, and one way to start the ranks of an in-process multi-rank test (``run_ranks``).

Import it as ``from tests import helpers`` (tests/conftest.py puts the checkout on
``sys.path``; runners started by a test get ``PYTHONPATH`` = the checkout from ``child_env``).

Launch rules (RELIABILITY.md section 5, first written for the reliability suite):

* every job runs in its own session with a hard timeout; on a timeout the whole process
  group is SIGKILLed, and afterwards no process of the session may be left alive (a
  survivor fails the test: a leaked rank would hold ports and CPU for the next test);
* the child's environment comes from ``child_env``: no launcher, rank or test-fault variable
  of the calling process leaks in, ``OMP_NUM_THREADS=1`` (2-core machines),
  ``DS_ACCELERATOR=cpu``, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (a restarted torchrun
  worker group otherwise reuses a stale TCPStore, pytorch #135712), ``PYTHONHASHSEED=0``;
* torchrun runs ``--standalone`` (it picks a free rendezvous port itself) with
  ``--monitor-interval=0.5``, so a dead rank is noticed within a second.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

# the toy data, re-exported: tests call helpers.toy_shards(...), helpers.toy_tokenizer()
from tests.toy_data import (  # noqa: F401
    EOD,
    VOCAB,
    build_tiny_corpus_and_shards,
    toy_fingerprint,
    toy_shards,
    toy_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent
TINY_CPU = ROOT / "configs" / "tiny_cpu.json"

# --------------------------------------------------------------------------- toy data and configs


def toy_config_dict(run_dir: Path | str | None = None, prefixes: list[Path | str] | None = None, *,
                    tokenizer: Path | str | None = None, **sections: dict[str, Any]) -> dict[str, Any]:
    """The toy run config as a dict: configs/tiny_cpu.json with the run directory, the shard
    prefixes, ``data.tokenizer`` (default: the toy tokenizer, which wrote the toy shards) and
    ``sections`` deep-merged into it: ``toy_config_dict(model={"n_layer": 2},
    deepspeed={"zero_optimization": {"stage": 3}})`` changes those keys and keeps the rest.

    Every test run config starts here, so a test states only what it relies on."""
    cfg = json.loads(TINY_CPU.read_text())
    cfg["data"]["tokenizer"] = str(tokenizer if tokenizer is not None else toy_tokenizer())
    _deep_merge(cfg, sections)
    return make_config(cfg, run_dir, prefixes)


def toy_config(run_dir: Path | str | None = None, prefixes: list[Path | str] | None = None, *,
               tokenizer: Path | str | None = None, **sections: dict[str, Any]) -> Any:
    """``toy_config_dict(...)`` loaded as a ``gpt_dist.config.Config``."""
    from gpt_dist.config import config_from_dict

    return config_from_dict(toy_config_dict(run_dir, prefixes, tokenizer=tokenizer, **sections))


def _deep_merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def make_config(base: dict[str, Any], run_dir: Path | str | None = None,
                prefixes: list[Path | str] | None = None, **overrides: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with the run directory, the shard prefixes and overrides:
    ``section__key=value`` sets one key, ``section=value`` replaces a whole section."""
    cfg = copy.deepcopy(base)
    if run_dir is not None:
        cfg["run"]["dir"] = str(run_dir)
    if prefixes is not None:
        cfg["data"]["prefixes"] = [str(p) for p in prefixes]
    for key, value in overrides.items():
        if "__" not in key:
            cfg[key] = value
            continue
        section, name = key.split("__", 1)
        cfg[section][name] = value
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))
    return path


# --------------------------------------------------------------------------- ZeRO-3


def zero3(**extra: Any) -> dict[str, Any]:
    """A ``zero_optimization`` section under which ZeRO-3 really partitions the tiny test models.

    DeepSpeed keeps every parameter below ``stage3_param_persistence_threshold`` (default
    1e5 elements) whole on every rank, which is every tensor of a 32-wide test model: the
    gather/release path of forward and backward would never run. Threshold 0 partitions
    them all; the small live-parameter and prefetch limits make DeepSpeed release each
    module's parameters after use and prefetch little, as it must for a model that does not
    fit. ``assert_zero3_partitioned`` checks the result from the run's metrics."""
    return {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 10_000,
            "stage3_prefetch_bucket_size": 5_000, **extra}


def assert_zero3_partitioned(records: list[dict[str, Any]], dp: int = 2) -> int:
    """Every ``zero3_partition`` report (tests/faults.py ``Zero3Report``, logged at the first
    step each process ran) shows each rank holding ceil(numel / dp) elements of every
    parameter, none persistent, none left gathered after the step. Returns the count."""
    reports = [r["zero3_partition"] for r in records if "zero3_partition" in r]
    assert reports, "no zero3_partition record: not a ZeRO-3 run, or its runner passed no Zero3Report"
    for rep in reports:
        assert rep["dp"] == dp, rep["dp"]
        assert rep["ranks"] and all(rep["ranks"]), rep
        for rank, params in enumerate(rep["ranks"]):
            for name, (numel, part, held, persist) in params.items():
                where = f"rank {rank} {name}: numel {numel}, partition {part}, held {held}"
                assert not persist, f"{where}: persistent (kept whole on every rank)"
                # a 1-element tensor (a 1-output head's bias) cannot be split: one element each
                assert part == -(-numel // dp) and (part < numel or numel < dp), \
                    f"{where}: not partitioned over dp={dp}"
                assert held == 0, f"{where}: still gathered after the step"
    return len(reports)


def metrics_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every line of RUN/metrics.jsonl, in write order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- launching

_DROP_PREFIXES = ("GPT_DIST_TEST_", "TORCHELASTIC_", "MASTER_", "SLURM_", "OMPI_", "PMI_", "PMIX_",
                  "MPI_", "HYDRA_")
_DROP_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
              "GPT_DIST_TRUST_CHECKPOINT")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a launched job (see the module docstring); ``extra`` wins.

    An in-process ParallelContext of another test leaves RANK/MASTER_PORT in os.environ:
    they are dropped, so every child picks its own rendezvous."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP_PREFIXES) and k not in _DROP_KEYS}
    env.update(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", PYTHONHASHSEED="0", CUDA_VISIBLE_DEVICES="",
               GPT_DIST_PG_TIMEOUT="60", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(extra)
    return env


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together while picking, so never the same twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def torchrun_cmd(script: Path | str, *args: Any, nproc: int = 2, max_restarts: int = 0) -> list[str]:
    """``python -m torch.distributed.run --standalone ... SCRIPT ARGS``."""
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "--monitor-interval=0.5", str(script), *map(str, args)]


def python_cmd(script: Path | str, *args: Any) -> list[str]:
    return [PY, str(script), *map(str, args)]


def tail(path: Path | str, n: int = 60) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"<no {path}>"


@dataclass
class Result:
    """A finished job: exit code, output (the log file's text when it wrote one), timing."""

    rc: int
    stdout: str
    stderr: str
    wall_s: float
    run_dir: Path | None = None
    restarts: int = 0
    env: dict[str, str] = field(default_factory=dict)
    end_time: float = field(default_factory=time.time)  # wall clock when the job had exited

    @property
    def returncode(self) -> int:
        return self.rc

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self) -> str:
        return f"rc={self.rc} after {self.wall_s:.1f}s\n--- output tail ---\n{self.output[-6000:]}"


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
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


def kill_session(sid: int) -> list[int]:
    """SIGKILL what is left of session ``sid`` and wait for it (5 s); returns what was left."""
    left = session_pids(sid)
    if not left:
        return []
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in left:  # a child that left the process group is still in the session
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


class Job:
    """A supervised child process in its own session (``with Job(...) as job:``).

    Output goes to ``log`` (stdout and stderr together) when given, else to pipes.
    Leaving the ``with`` block kills whatever of the session is still running."""

    def __init__(self, cmd: list[Any], *, env: dict[str, str] | None = None, cwd: Path | str = ROOT,
                 log: Path | str | None = None) -> None:
        self.cmd = [str(c) for c in cmd]
        self.env = env if env is not None else child_env()
        self.log = Path(log) if log is not None else None
        self._fh = open(self.log, "w") if self.log is not None else None  # noqa: SIM115 - closed in wait()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=str(cwd), env=self.env, text=True, start_new_session=True,
                                     stdout=self._fh if self._fh else subprocess.PIPE,
                                     stderr=subprocess.STDOUT if self._fh else subprocess.PIPE)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float, *, run_dir: Path | None = None) -> Result:
        """Wait at most ``timeout`` s; on a timeout kill the session and fail. Fails too if a
        process of the session outlived the job."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(self.pid)
            out, err = self.proc.communicate()
            text = self._text(out, err)
            raise AssertionError(f"{Path(self.cmd[0]).name} ... timed out after {timeout}s and was killed\n"
                                 f"{text[-6000:]}") from None
        finally:
            if self._fh is not None:
                self._fh.close()
        end = time.time()
        # a child still tearing down (gloo threads, a forked worker's exit) when the main
        # process returned is not a leak: give the session 10 s to empty by itself; what is
        # left then (a leaked rank holding ports and CPU) fails the test
        grace = time.monotonic() + 10
        while session_pids(self.pid) and time.monotonic() < grace:
            time.sleep(0.1)
        left = kill_session(self.pid)
        if left:
            raise AssertionError(f"processes of the job's session survived its exit: {left}")
        stdout = self._text(out, err) if self.log is not None else out
        return Result(self.proc.returncode, stdout, "" if self.log is not None else err,
                      time.monotonic() - self.t0, run_dir, env=self.env, end_time=end)

    def _text(self, out: str | None, err: str | None) -> str:
        if self.log is not None:
            return self.log.read_text(errors="replace")
        return (out or "") + (err or "")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            kill_session(self.pid)
            self.proc.wait()
        if self._fh is not None and not self._fh.closed:
            self._fh.close()


def run(cmd: list[Any], *, timeout: float, env: dict[str, str] | None = None, cwd: Path | str = ROOT,
        log: Path | str | None = None, run_dir: Path | None = None) -> Result:
    """Run ``cmd`` to completion under the launch rules (module docstring)."""
    with Job(cmd, env=env, cwd=cwd, log=log) as job:
        return job.wait(timeout, run_dir=run_dir)


# --------------------------------------------------------------------------- in-process models


@contextlib.contextmanager
def tp1_without_groups() -> Any:
    """megatron-core's TP size/rank getters answer 1/0 without a process group, so a TP=1
    model can be built (and loaded) in the test process without initialising torch.distributed."""
    from megatron.core import parallel_state as ps

    saved = (ps._MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE, ps._MPU_TENSOR_MODEL_PARALLEL_RANK)
    ps.set_tensor_model_parallel_world_size(1)
    ps.set_tensor_model_parallel_rank(0)
    try:
        yield
    finally:
        ps.set_tensor_model_parallel_world_size(saved[0])
        ps.set_tensor_model_parallel_rank(saved[1])


@contextlib.contextmanager
def solo_context(device: str = "cpu", *, keep_env: bool = False) -> Any:
    """A world-size-1 ``ParallelContext`` in the test process (megatron-core's groups exist,
    so the tensor-parallel layers run), destroyed when the block ends. The launcher
    variables it sets (RANK, LOCAL_RANK, MASTER_PORT...) are removed again right away, or
    with ``keep_env`` when the block ends (a DeepSpeed engine built in the test process
    reads LOCAL_RANK). A second one in the same process shares the first's process group."""
    from gpt_dist import deepspeed_compat
    from gpt_dist.config import ParallelConfig
    from gpt_dist.parallel import ParallelContext

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    deepspeed_compat.skip_shm_comm_build()  # the CPU inference op nothing here uses (a minute of compiling)
    saved = dict(os.environ)

    def restore() -> None:
        os.environ.clear()
        os.environ.update(saved)

    try:
        ctx = ParallelContext.from_env(ParallelConfig(), device=device)
    finally:
        if not keep_env:
            restore()
    try:
        with ctx:
            yield ctx
    finally:
        restore()


def next_world_port(ctx: Any) -> int:
    """A free port for the worker's next world, picked by rank 0 now (not at launch: another
    test could take a port picked a minute earlier) and broadcast, so one ``run_ranks`` launch
    can go through several world sizes (tests/training, tests/finetune workers). Call it
    inside the ``with ParallelContext...`` block, whose exit then destroys the groups."""
    import gc

    import torch.distributed as dist

    port = [free_port() if ctx.rank == 0 else None]
    dist.broadcast_object_list(port, src=0)
    gc.collect()  # engines of this world release their group handles before the groups go
    return int(port[0])


def world(rank: int, size: int, *, tp: int = 1, pp: int = 1, port: int | None = None) -> Any:
    """A ``ParallelContext`` of ``size`` ranks with this tp/pp on the CPU, for the workers that go
    through several worlds in one ``run_ranks`` launch: the first world's rendezvous is
    ``run_ranks``'; a later one passes the ``port`` the previous world picked
    (``next_world_port``). Use it as ``with world(...) as ctx``: its exit destroys the groups."""
    from gpt_dist.config import ParallelConfig
    from gpt_dist.parallel import ParallelContext

    if port is not None:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_PORT=str(port))
    return ParallelContext.from_env(ParallelConfig(tp=tp, pp=pp), device="cpu", timeout_s=240)


def preload_trainer() -> None:
    """In a worker's parent, before ``run_ranks`` forks: import DeepSpeed, megatron-core and the
    trainers once (4 processes that each import them cost ~4x the CPU time on a 2-core
    machine; nothing distributed exists yet), and skip DeepSpeed's shared-memory op, which its
    TorchBackend JIT-builds into ~/.cache/torch_extensions (used by inference only; concurrent
    sessions with other include paths keep rebuilding it, 60-130 s each under load)."""
    os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import deepspeed  # noqa: F401
    import megatron.core.tensor_parallel  # noqa: F401

    import gpt_dist.finetune.session
    import gpt_dist.training.pretrain  # noqa: F401
    from gpt_dist import deepspeed_compat

    deepspeed_compat.skip_shm_comm_build()


def copy_checkpoint(src_run: Path | str, dst_run: Path | str, tag: str) -> Path:
    """Copy one committed checkpoint (and the run's manifest key) into a fresh run dir, with
    ``latest`` pointing at it: a new run that resumes from another run's checkpoint."""
    src, dst = Path(src_run) / "checkpoints", Path(dst_run) / "checkpoints"
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / tag, dst / tag)
    if (src / ".manifest_key").exists():
        shutil.copy2(src / ".manifest_key", dst / ".manifest_key")
    (dst / "latest").write_text(tag)
    return dst / tag


# --------------------------------------------------------------------------- in-process ranks


class RankFailed(RuntimeError):
    """A rank of ``run_ranks`` raised, died or outlived the timeout; the message names it."""


def _rank_main(rank: int, fn: Any, world: int, port: int, args: tuple[Any, ...]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    import torch

    torch.set_num_threads(1)
    fn(rank, *args)


def run_ranks(fn: Any, world: int, *args: Any, timeout: float, start_method: str = "fork") -> None:
    """Run ``fn(rank, *args)`` in ``world`` processes, one per rank: the one way tests start
    the ranks of an in-process multi-rank run (tests of a launcher use that launcher).

    Each child gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and a free MASTER_PORT (so
    ``ParallelContext.from_env`` works as under torchrun), one thread and the CPU accelerator.
    ``fork`` (default) lets the caller import DeepSpeed and the trainer once for every rank.
    The first rank to raise or die fails the call with its rank and traceback, and the other
    ranks are then stopped; after ``timeout`` seconds every rank still running is SIGKILLed
    and the call fails. No rank outlives the call."""
    import torch.multiprocessing as mp

    pc = mp.start_processes(_rank_main, args=(fn, world, free_port(), args), nprocs=world, join=False,
                            start_method=start_method)
    deadline = time.monotonic() + timeout
    try:
        while not pc.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                alive = [rank for rank, p in enumerate(pc.processes) if p.is_alive()]
                raise RankFailed(f"ranks {alive} of {world} still running after {timeout}s: killed")
    except mp.ProcessRaisedException as exc:
        raise RankFailed(f"rank {exc.error_index} of {world} raised:\n{exc}") from None
    except mp.ProcessExitedException as exc:
        raise RankFailed(f"rank {exc.error_index} of {world} exited with {exc.exit_code}"
                         f"{f' (signal {exc.signal_name})' if exc.signal_name else ''}") from None
    finally:
        for p in pc.processes:
            if p.is_alive():
                p.kill()
        for p in pc.processes:
            p.join()
