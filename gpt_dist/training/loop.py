"""The training loop, shared by pretraining and fine-tuning: ``train_loop`` and its parts.

``training/session.py`` sets up and tears down around it (context, engine, ``init_from``,
``resume``); ``gpt_dist.training.pretrain.pretrain`` runs it with ``LMObjective``,
``gpt_dist.finetune.session.finetune`` with ``TaskObjective``. The loop knows nothing about
the task (``training/objective.py``) and nothing about parallelism beyond calling the engine;
the data position is ``consumed_samples`` and all RNG state goes into every checkpoint, so a
resumed run repeats the uninterrupted one exactly (tests/training/test_resume.py,
tests/reliability/).

A caller watches or perturbs the run only through the ``hooks`` object it passes
(``gpt_dist.training.hooks.TrainHooks``; the reliability suite's faults are in tests/).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt_dist import deepspeed_compat, rng
from gpt_dist.config import Config, Schedule, TrainingConfig
from gpt_dist.parallel import ParallelContext
from gpt_dist.training import checkpoint as ckpt
from gpt_dist.training import reshard
from gpt_dist.training.engine import Engine
from gpt_dist.training.hooks import NO_HOOKS, TrainHooks
from gpt_dist.training.metrics import RunLogger
from gpt_dist.training.objective import Objective

EXIT_NONFINITE = 17  # Megatron's rerun machine uses 16/17 for "stop, do not requeue"


class NonFiniteLossError(RuntimeError):
    """``training.max_consecutive_skips`` non-finite steps in a row: the session ends the
    process with ``EXIT_NONFINITE`` (a requeue would only repeat them)."""


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    tokens_seen: int = 0
    last_val_loss: float | None = None
    best: dict[str, Any] | None = None
    """Fine-tuning: the best validation result so far ({step, metric, value, metrics})."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class StopFlag:
    """Set from a signal handler (SIGTERM / SIGUSR1: Slurm's preemption warning)."""

    signum: int = 0
    handlers: dict[int, Any] = field(default_factory=dict)

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self.handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)


def client_state(cfg: Config, state: TrainState, fingerprint: str) -> dict[str, Any]:
    return {"gpt_dist": {"train_state": state.to_dict(), "config": cfg.to_dict(),
                         "tokenizer_fingerprint": fingerprint}}


def save_checkpoint(cfg: Config, ctx: ParallelContext, eng: Engine, state: TrainState,
                    fingerprint: str, log: RunLogger, hooks: TrainHooks = NO_HOOKS) -> Path | None:
    tag_dir = ckpt.save(
        eng.ds, ctx, cfg.run_dir, state.step, client_state(cfg, state, fingerprint),
        extra_manifest={"train_state": state.to_dict(), "config": cfg.to_dict(),
                        "tokenizer_fingerprint": fingerprint,
                        "layout": {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp, "world_size": ctx.world_size,
                                   "zero_stage": cfg.zero_stage, "precision": cfg.training.precision}},
        rng_state=rng.rng_state_dict(), keep_last=cfg.checkpoint.keep_last,
        on_disk_full=cfg.checkpoint.on_disk_full, hooks=hooks,
        extra_state=(lambda tag_dir, write: reshard.write_state(eng, ctx, cfg, tag_dir, write))
        if cfg.checkpoint.layout_free else None)
    log.write(f"checkpoint {'saved: ' + str(tag_dir) if tag_dir else 'DROPPED (disk full)'} "
              f"at step {state.step}")
    return tag_dir


def resume(cfg: Config, ctx: ParallelContext, eng: Engine, state: TrainState,
           log: RunLogger, hooks: TrainHooks = NO_HOOKS, plan: reshard.ResumePlan | None = None,
           planned: bool = False) -> TrainState:
    """Load the newest committed checkpoint of the run, verified first; or start fresh.

    ``plan``/``planned``: ``reshard.plan_resume``'s decision, made (with its checks) before the
    process groups existed (``training_session``); without one it is made here. In the
    checkpoint's own layout DeepSpeed loads its files (bit-exact, RNG included); in another
    the layout-free state is loaded instead (``training/reshard.py``)."""
    if not planned:
        plan = reshard.plan_resume(cfg, new=reshard.Layout(ctx.tp, ctx.pp, ctx.dp, cfg.zero_stage,
                                                           cfg.training.precision))
    if plan is None:
        return state
    found = plan.found
    for reason in found.skipped:
        log.write(f"skipped checkpoint: {reason}")
    load_optim = hooks.should_restore("optim")
    if plan.reshard:
        log.write(plan.describe())
        reshard.read_state(eng, ctx, cfg, found.path, found.manifest["layout_free"], restore_optim=load_optim)
    else:
        eng.ds.load_checkpoint(str(found.path.parent), tag=found.tag, load_module_strict=True,
                               load_optimizer_states=load_optim, load_lr_scheduler_states=load_optim)
    restored = TrainState(**found.manifest["train_state"])
    if not hooks.should_restore("data"):
        restored.consumed_samples = 0
    if plan.reshard:  # dropout masks depend on the layout: a fresh, deterministic stream
        rng.seed_all(reshard.derived_seed(cfg.training.seed, restored.step), tp_rank=ctx.tp_rank, pp_rank=ctx.pp_rank)
    elif hooks.should_restore("rng"):
        saved_rng = ckpt.load_rng(found.path, ctx.rank)
        if saved_rng is not None:
            rng.load_rng_state_dict(saved_rng)
    hooks.after_resume(eng, ctx, found.path, plan.reshard)
    log.write(f"resumed from {found.path} (step {restored.step}, "
              f"{restored.consumed_samples} samples consumed)")
    return restored


def train_step(cfg: Config, ctx: ParallelContext, eng: Engine, objective: Objective,
               batches: Iterator[dict[str, torch.Tensor]],
               hooks: TrainHooks = NO_HOOKS, step: int = 0) -> tuple[float, torch.Tensor | None, bool]:
    """One optimizer step (number ``step``) over the micro-batches; returns (global mean loss,
    the objective's mean metrics or None, skipped). ``hooks.transform_loss`` sees each
    micro-batch's loss (not under pp > 1).

    ``eng.ds.step()`` after each micro-batch is DeepSpeed's contract: it applies the update at
    the accumulation boundary only. A non-finite gradient anywhere makes the update a no-op on
    every rank (``NonFiniteGuard``); with fp16 DeepSpeed's loss scaler skips it instead.
    """
    eng.guard.skipped = False
    skips_before = getattr(eng.ds, "skipped_steps", 0)
    lr_pos = getattr(eng.scheduler, "last_epoch", None)
    if eng.is_pipeline:  # DeepSpeed runs the 1F1B schedule over the micro-batches itself
        loss = eng.ds.train_batch(data_iter=(objective.pipe_item(b) for b in batches))
        metrics = objective.pipe_metrics()
        skipped = eng.guard.skipped or eng.ds.skipped_steps > skips_before
        _count_skipped_step(cfg.training, eng, skipped, lr_pos)
        return float(loss.item()), metrics, skipped
    total = torch.zeros(1, dtype=torch.float64, device=ctx.device)
    metric_sum: torch.Tensor | None = None
    n = 0
    for batch in batches:
        loss, metrics = objective.loss(eng.ds(*objective.model_inputs(batch)), batch)
        loss = hooks.transform_loss(step, ctx, loss)
        eng.ds.backward(loss)
        eng.ds.step()
        total += loss.detach().double()
        if metrics is not None:
            metric_sum = metrics.double() if metric_sum is None else metric_sum + metrics.double()
        n += 1
    loss_mean = objective.dp_mean(total / n)
    metric_mean = objective.dp_mean(metric_sum / n) if metric_sum is not None else None
    skipped = eng.guard.skipped or getattr(eng.ds, "skipped_steps", 0) > skips_before
    _count_skipped_step(cfg.training, eng, skipped, lr_pos)
    return float(loss_mean.item()), metric_mean, skipped


def _count_skipped_step(training: TrainingConfig, eng: Engine, skipped: bool, lr_pos: int | None) -> None:
    """A skipped fp32/bf16 step still counts: advance the LR schedule DeepSpeed did not.

    ZeRO-1/2 check gradients for inf/NaN even in fp32 and, finding one, skip both the update
    and ``lr_scheduler.step()`` (its fp16 loss-scaler path); ``NonFiniteGuard`` (ZeRO-0/3,
    pipeline) skips only the update. The policy is the same whichever caught it: the batch is
    consumed and the schedule moves on (README, "Non-finite loss"; T7). Under fp16 a skip is
    the loss scaler's overflow step and DeepSpeed's behaviour (schedule holds) is kept.
    """
    if (skipped and training.precision != "fp16" and lr_pos is not None
            and getattr(eng.scheduler, "last_epoch", None) == lr_pos):
        eng.scheduler.step()


def train_loop(cfg: Config, ctx: ParallelContext, eng: Engine, objective: Objective, state: TrainState,
               fingerprint: str, log: RunLogger, stop: StopFlag, hooks: TrainHooks = NO_HOOKS,
               on_eval: Callable[[int, dict[str, float]], bool] | None = None,
               on_saved: Callable[[int, Path | None], None] | None = None,
               schedule: Schedule | None = None) -> TrainState:
    """Steps until ``schedule.train_steps``: evaluate every ``eval_interval``, checkpoint every
    ``save_interval`` (and at the end, at a signal). ``on_eval(step, metrics)`` returning True
    asks for a checkpoint at that step (fine-tuning's best model); ``on_saved(step, path)``
    runs on every rank after each save. ``schedule``: default the config's sections as written
    (``Config.run_schedule``)."""
    t, plan = cfg.training, schedule or cfg.run_schedule()
    log.extra_keys = objective.metric_names
    log.write(plan.describe())
    while state.step < plan.train_steps:
        hooks.on_step_start(state.step + 1, ctx, stop)
        if ctx.all_reduce_max(float(stop.signum)) > 0:  # every rank saves at the same step
            log.write(f"signal received: saving at step {state.step} and exiting")
            tag_dir = save_checkpoint(cfg, ctx, eng, state, fingerprint, log, hooks)
            if on_saved is not None:
                on_saved(state.step, tag_dir)
            return state
        digest = objective.sample_digest(state.step, state.consumed_samples)
        batches = objective.micro_batches(state.step, state.consumed_samples)
        tokens_per_step = objective.tokens_per_step(state.step, state.consumed_samples)
        loss, metrics, skipped = train_step(cfg, ctx, eng, objective, batches, hooks, state.step + 1)
        state.step += 1
        state.consumed_samples += t.global_batch_size
        state.tokens_seen += tokens_per_step
        state.skipped_steps += int(skipped)
        state.consecutive_skips = state.consecutive_skips + 1 if skipped else 0
        gnorm = eng.ds.get_global_grad_norm()
        record = {"step": state.step, "loss": loss, "lr": eng.optimizer.param_groups[0]["lr"],
                  "grad_norm": float(gnorm) if gnorm is not None else float("nan"),
                  "loss_scale": deepspeed_compat.loss_scale(eng.ds), "skipped": state.skipped_steps,
                  "consumed_samples": state.consumed_samples, "samples_sha": digest}
        if metrics is not None:
            record.update(zip(objective.metric_names, (float(v) for v in metrics.tolist()), strict=True))
        hooks.after_step(record, eng, ctx)
        log.step(record, tokens_per_step)
        if skipped:
            log.write(f"step {state.step}: non-finite loss on some rank; update skipped "
                      f"({state.consecutive_skips} in a row)")
            if state.consecutive_skips >= t.max_consecutive_skips:
                raise NonFiniteLossError(
                    f"step {state.step}: {state.consecutive_skips} consecutive non-finite steps "
                    f"(training.max_consecutive_skips={t.max_consecutive_skips}); stopping")
        want_save = False
        if plan.evaluates_at(state.step):
            results = objective.evaluate(eng, state.step)
            if results:
                state.last_val_loss = results.get("loss", results.get("task_loss"))
                log.eval(state.step, results)
                want_save = bool(on_eval(state.step, results)) if on_eval is not None else False
        if want_save or plan.saves_at(state.step):
            tag_dir = save_checkpoint(cfg, ctx, eng, state, fingerprint, log, hooks)
            if on_saved is not None:
                on_saved(state.step, tag_dir)
    return state

