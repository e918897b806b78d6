"""One training session: what pretraining and fine-tuning both run around their objective.

    with training_session(cfg, fingerprint, ctx, hooks) as s:  # signals, determinism, context,
        data = ...                                             #   seeds, run dir, logger
        s.start()                                              # engine, init_from, resume
        state = s.train(objective)                             # the loop (training/loop.py)
    # tear-down on every exit path: signal handlers, logger, the process groups it created

``gpt_dist.training.pretrain.pretrain`` runs it with ``LMObjective`` and
``gpt_dist.finetune.session.finetune`` with ``TaskObjective`` (plus its best-model and
prediction steps around ``train``). Only what depends on the task lies outside: reading the
data, building the objective, what happens after the last step.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpt_dist import rng
from gpt_dist.config import Config, Schedule, bubble_fraction, dump_config
from gpt_dist.parallel import ParallelContext, launch_world_size
from gpt_dist.training.engine import Engine, build_engine
from gpt_dist.training.hooks import NO_HOOKS, TrainHooks
from gpt_dist.training.init_from import load_into_engine
from gpt_dist.training.loop import EXIT_NONFINITE, NonFiniteLossError, StopFlag, TrainState, resume, train_loop
from gpt_dist.training.metrics import RunLogger
from gpt_dist.training.objective import Objective
from gpt_dist.training.reshard import ResumePlan, plan_resume


@dataclass
class Session:
    """One run in one process: its context, logger and stop flag, then its engine and state."""

    cfg: Config
    ctx: ParallelContext
    log: RunLogger
    stop: StopFlag
    fingerprint: str
    """The run's tokenizer's, stored in every checkpoint."""
    hooks: TrainHooks = NO_HOOKS
    schedule: Schedule | None = None
    """Steps, warm-up, decay, eval and save intervals (derived: ``Config.run_schedule``)."""
    plan: ResumePlan | None = None
    """What to resume from and how (``reshard.plan_resume``, decided before the groups)."""
    planned: bool = False
    eng: Engine | None = None
    state: TrainState = field(default_factory=TrainState)

    def start(self) -> Engine:
        """Build the engine, load ``checkpoint.init_from`` into it (a fresh run's starting
        weights), then resume the run's newest committed checkpoint, if any (which wins)."""
        cfg = self.cfg
        self.eng = build_engine(cfg, self.ctx, schedule=self.schedule)
        if cfg.checkpoint.init_from:
            load_into_engine(cfg.checkpoint.init_from, self.eng, cfg, self.ctx)
            self.log.write(f"initialised from {cfg.checkpoint.init_from}")
        self.state = resume(cfg, self.ctx, self.eng, TrainState(), self.log, self.hooks,
                            plan=self.plan, planned=self.planned)
        self.log.resume_at(self.state.step)
        return self.eng

    def train(self, objective: Objective,
              on_eval: Callable[[int, dict[str, float]], bool] | None = None,
              on_saved: Callable[[int, Path | None], None] | None = None) -> TrainState:
        """The loop from the resumed state to ``training.train_steps`` or a stop signal
        (``train_loop``: ``on_eval`` may ask for a checkpoint, ``on_saved`` follows each)."""
        if self.eng is None:
            raise RuntimeError("Session.train: call Session.start first (no engine)")
        self.state = train_loop(self.cfg, self.ctx, self.eng, objective, self.state, self.fingerprint,
                                self.log, self.stop, self.hooks, on_eval=on_eval, on_saved=on_saved,
                                schedule=self.schedule)
        return self.state

    @property
    def finished(self) -> bool:
        """The run reached ``training.train_steps`` (False after a preemption signal)."""
        steps = self.schedule.train_steps if self.schedule is not None else self.cfg.training.train_steps
        return not self.stop.signum and self.state.step >= steps


@contextlib.contextmanager
def training_session(cfg: Config, fingerprint: str, ctx: ParallelContext | None = None,
                     hooks: TrainHooks | None = None, schedule: Schedule | None = None) -> Iterator[Session]:
    """Set up a training run and tear it down on every exit path.

    Set-up: SIGTERM/SIGUSR1 handlers (a stop flag), deterministic algorithms if asked, the
    parallel context (built from the launcher's environment unless given), seeds, the run
    directory with its resolved config, the logger. Tear-down: a context built here is
    destroyed (after a barrier when the run ended normally; gloo's threads left to
    interpreter exit were occasionally destroyed while joinable, "terminate called without an
    active exception", turning a finished job into a SIGABRT), errors included; the logger is
    closed at a normal end. A ``NonFiniteLossError`` ends the process with ``EXIT_NONFINITE``
    after that tear-down."""
    stop = StopFlag()
    stop.install()
    nonfinite = False
    try:
        if cfg.training.deterministic:
            torch.use_deterministic_algorithms(True)
        with contextlib.ExitStack() as owned:
            # the checkpoint to resume, checked (verified, architecture, vocabulary, global
            # batch, layout) before any process group exists: a bad one is one line, not a hang
            resume_plan = plan_resume(cfg, ctx.world_size if ctx is not None else launch_world_size(),
                                      fingerprint=fingerprint)
            if ctx is None:  # built here, so destroyed here
                ctx = owned.enter_context(ParallelContext.from_env(cfg.parallel, device=cfg.training.device))
            rng.seed_all(cfg.training.seed, tp_rank=ctx.tp_rank, pp_rank=ctx.pp_rank)
            plan = schedule or cfg.run_schedule()
            log = RunLogger(cfg, ctx.world_size, ctx.device, 0, enabled=ctx.is_main, train_steps=plan.train_steps)
            if ctx.pp > 1:
                bubble = bubble_fraction(ctx.pp, cfg.grad_accum_steps(ctx.world_size))
                log.write(f"warning: pipeline bubble {bubble:.1%} of each step (pp={ctx.pp}, "
                          f"{cfg.grad_accum_steps(ctx.world_size)} micro-batches); more micro-batches shrink it")
            if ctx.is_main:
                cfg.run_dir.mkdir(parents=True, exist_ok=True)
                dump_config(cfg, cfg.run_dir / "config.json")
            try:
                yield Session(cfg, ctx, log, stop, fingerprint, hooks or NO_HOOKS, plan, resume_plan, True)
            except NonFiniteLossError as exc:
                log.write(f"error: {exc}")
                nonfinite = True
            log.close()
    finally:
        stop.restore()
    if nonfinite:
        sys.exit(EXIT_NONFINITE)
