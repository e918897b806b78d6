"""The test suite's fault injectors and probes: ``TrainHooks`` built from GPT_DIST_TEST_* variables.

The library reads no test variable (tests/test_no_test_hooks.py checks that). The tests
still choose faults per launch with environment variables, because a fault must reach every
rank of a torchrun/mpirun/Slurm job; the test runners (tests/reliability/_runner.py,
tests/cluster/_runner.py, tests/pipeline/run.py) read them here and pass the hooks to
``pretrain(cfg, hooks=...)``. The variables, as the suite has always used them:

``GPT_DIST_TEST_KILL_AT=STEP[:RANK[:hang]]``
    SIGKILL that rank (every rank without RANK) at the start of STEP, or make it sleep 600 s
    outside any collective (T6); first torchrun attempt only.
``GPT_DIST_TEST_INF_STEPS=6,7`` (``GPT_DIST_TEST_INF_RANK=1``)
    the loss of those steps is inf on that rank (every rank without INF_RANK).
``GPT_DIST_TEST_CRASH_IN_SAVE=STEP:RANK:PHASE[:ATTEMPT],...``
    SIGKILL that rank while saving STEP, in torchrun attempt ATTEMPT (default 0). PHASE is
    ``mid_shard`` (half of its first file written), ``before_commit`` (every file written,
    no manifest) or ``retention`` (rank 0, deleting an old checkpoint).
``GPT_DIST_TEST_ENOSPC_AT=STEP:RANK,...``
    that rank's checkpoint writes at STEP fail with ENOSPC after writing 1 KiB.
``GPT_DIST_TEST_DISABLE_RESTORE=rng,optim,data``
    resume skips those restores (the negative controls of T2).
``GPT_DIST_TEST_STATE_SHA=1``
    every record gets ``state_sha``: per rank, a sha256 of its parameters (its ZeRO
    partition) and inner optimizer state, gathered on all ranks.
``GPT_DIST_TEST_AWAIT_SIGNAL_AT=STEP``
    a fresh (not resumed) run holds before STEP until the rank got SIGTERM/SIGUSR1, at most
    120 s, so a preemption test's signal lands mid-run however fast the machine is.
``GPT_DIST_TEST_TIED_DIR=DIR``
    (pp > 1) after every step each rank holding the tied token embedding saves its copy to
    DIR/tied_rank{R}_step{S}.pt.

Every runner also reports ZeRO-3 partitioning (``Zero3Report``): the first step a ZeRO-3
process runs logs ``zero3_partition`` (per rank and parameter: full size, partition size,
elements held outside forward/backward, persistence), which tests/helpers.py checks.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gpt_dist.training.hooks import TrainHooks


def _attempt() -> str:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")


def _specs(value: str) -> list[list[str]]:
    return [item.split(":") for item in value.split(",") if item]


def _gather(ctx: Any, mine: Any) -> list[Any]:
    if not dist.is_initialized() or ctx.world_size == 1:
        return [mine]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, mine)
    return out


class EnvFaults(TrainHooks):
    """All the faults above, configured from an environment mapping (default ``os.environ``)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.kill = env.get("GPT_DIST_TEST_KILL_AT", "")
        self.inf_steps = {int(s) for s in env.get("GPT_DIST_TEST_INF_STEPS", "").split(",") if s}
        self.inf_rank = env.get("GPT_DIST_TEST_INF_RANK")
        self.inf_done: set[int] = set()
        self.crash = _specs(env.get("GPT_DIST_TEST_CRASH_IN_SAVE", ""))
        self.enospc = _specs(env.get("GPT_DIST_TEST_ENOSPC_AT", ""))
        self.disabled = set(env.get("GPT_DIST_TEST_DISABLE_RESTORE", "").split(",")) - {""}
        self.state_sha = env.get("GPT_DIST_TEST_STATE_SHA") == "1"
        at = env.get("GPT_DIST_TEST_AWAIT_SIGNAL_AT")
        self.hold_at = int(at) if at else None
        self.tied_dir = env.get("GPT_DIST_TEST_TIED_DIR")
        self.first_step: int | None = None
        self.zero3 = Zero3Report()

    # -- steps
    def on_step_start(self, step: int, ctx: Any, stop: Any) -> None:
        if self.first_step is None:
            self.first_step = step
        if self.hold_at == step and self.first_step == 1:  # a fresh run only
            deadline = time.monotonic() + 120
            while not stop.signum and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.kill and _attempt() == "0":
            at, _, rest = self.kill.partition(":")
            rank, _, action = rest.partition(":")
            if int(at) == step and (not rank or int(rank) == ctx.rank):
                if action == "hang":
                    time.sleep(600)
                os.kill(os.getpid(), signal.SIGKILL)

    def transform_loss(self, step: int, ctx: Any, loss: torch.Tensor) -> torch.Tensor:
        if step in self.inf_steps and self.inf_rank in (None, str(ctx.rank)):
            self.inf_done.add(step)
            return loss * float("inf")
        return loss

    def after_step(self, record: dict[str, Any], eng: Any, ctx: Any) -> None:
        step = record["step"]
        if step in self.inf_steps and self.inf_rank in (None, str(ctx.rank)) and step not in self.inf_done:
            raise RuntimeError(f"GPT_DIST_TEST_INF_STEPS: the loss of step {step} was never made inf "
                               "(the pipeline engine computes its loss out of reach of the hooks)")
        if self.state_sha:
            record["state_sha"] = state_sha(eng, ctx)
        self.zero3.after_step(record, eng, ctx)
        if self.tied_dir and eng.is_pipeline and "embed" in eng.ds.module.tied_modules:
            w = eng.ds.module.tied_modules["embed"].wte.weight.detach().clone()
            torch.save(w, os.path.join(self.tied_dir, f"tied_rank{ctx.rank}_step{eng.ds.global_steps}.pt"))

    def should_restore(self, what: str) -> bool:
        return what not in self.disabled

    # -- checkpoints
    def _crash_spec(self, step: int, rank: int, phase: str) -> bool:
        return any(int(p[0]) == step and int(p[1]) == rank and p[2] == phase
                   and (p[3] if len(p) > 3 else "0") == _attempt() for p in self.crash)

    def on_checkpoint_write(self, step: int, rank: int, path: Path, state: Any) -> None:
        if any(int(p[0]) == step and int(p[1]) == rank for p in self.enospc):
            with open(path, "wb") as fh:
                fh.write(b"\0" * 1024)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        if self._crash_spec(step, rank, "mid_shard"):
            buf = io.BytesIO()
            torch.save(state, buf)
            data = buf.getvalue()
            with open(path, "wb") as fh:  # half of the file, on disk, then the process dies
                fh.write(data[: max(1, len(data) // 2)])
                fh.flush()
                os.fsync(fh.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

    def on_checkpoint_phase(self, step: int, rank: int, phase: str) -> None:
        if self._crash_spec(step, rank, phase):
            os.kill(os.getpid(), signal.SIGKILL)


def state_sha(eng: Any, ctx: Any) -> list[str]:
    """Per rank, a sha256 of the parameters this rank holds and the inner optimizer's state
    (ZeRO partitions included), gathered on all ranks: lets the reliability suite assert
    "unchanged across a skipped step" and exact resumes."""
    h = hashlib.sha256()

    def add(value: Any) -> None:
        if torch.is_tensor(value):
            h.update(value.detach().float().cpu().contiguous().reshape(-1).numpy().tobytes())
        else:
            h.update(repr(value).encode())

    for p in eng.ds.module.parameters():
        add(getattr(p, "ds_tensor", p))
    for group in eng.optimizer.param_groups:
        for p in group["params"]:
            add(p)
            for key, value in sorted(eng.optimizer.state.get(p, {}).items()):
                add(key)
                add(value)
    return _gather(ctx, h.hexdigest()[:16])


class Zero3Report(TrainHooks):
    """At the first step a ZeRO-3 process runs, log how each rank holds each parameter.

    ``record["zero3_partition"] = {"dp": DP, "ranks": [{name: [numel, partition numel,
    elements held now, persistent]}, ...]}``. After the step every parameter should be
    released (0 elements held) with a partition of ceil(numel / dp): then forward and
    backward had to gather every parameter (tests/helpers.py: assert_zero3_partitioned).
    """

    def __init__(self) -> None:
        self.done = False

    def after_step(self, record: dict[str, Any], eng: Any, ctx: Any) -> None:
        if self.done:
            return
        self.done = True
        params = list(eng.ds.module.named_parameters())
        if not params or not hasattr(params[0][1], "ds_tensor"):
            return
        mine = {name: [int(p.ds_numel), int(p.ds_tensor.numel()), int(p.data.numel()), bool(p.ds_persist)]
                for name, p in params}
        record["zero3_partition"] = {"dp": ctx.dp, "ranks": _gather(ctx, mine)}


def patch_pretrain(hooks: TrainHooks) -> None:
    """Make ``gpt_dist.training.pretrain.pretrain`` pass ``hooks`` (for runners that run
    launch/pretrain.py itself, which imports ``pretrain`` when it runs)."""
    import gpt_dist.training.pretrain as P

    P.pretrain = functools.partial(P.pretrain, hooks=hooks)
