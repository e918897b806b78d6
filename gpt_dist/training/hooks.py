"""The points where a caller may watch or perturb a training run: ``TrainHooks``.

``pretrain(cfg, ctx, hooks=...)`` calls these methods at fixed points on every rank; the
defaults do nothing, so a run without hooks (every production run) is the plain loop. The
reliability suite subclasses ``TrainHooks`` in tests/faults.py to kill a rank at a step, make
a loss infinite, fail a checkpoint write, switch one restore off (its negative controls) or
record state digests. The library never reads a test variable: a fault exists only when a
caller builds the object and passes it, so nothing leaks into a real job through the
environment (sbatch exports the submitting shell's).

Hooks observe and perturb; they do not decide what a step computes. The training objective
(which micro-batches a step sees, the loss of one, evaluation) is a separate concern of the
loop, and ``transform_loss`` only ever receives the loss the objective produced.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from gpt_dist.parallel import ParallelContext
    from gpt_dist.training.engine import Engine
    from gpt_dist.training.loop import StopFlag

RESTORES = ("optim", "rng", "data")
"""What ``resume`` restores besides the weights: optimizer + LR schedule, RNG, data position."""

SAVE_PHASES = ("before_commit", "retention")
"""Points of ``checkpoint.save`` after the files are written (see ``on_checkpoint_phase``)."""


class TrainHooks:
    """No-op hooks; subclass and override what you need. Called on every rank."""

    def on_step_start(self, step: int, ctx: ParallelContext, stop: StopFlag) -> None:
        """Before step ``step`` (1-based) runs, before the loop checks for a stop signal.

        ``stop.signum`` is non-zero once this rank got SIGTERM/SIGUSR1; setting it asks
        every rank to save and exit at this step (the flag is all-reduced)."""

    def transform_loss(self, step: int, ctx: ParallelContext, loss: torch.Tensor) -> torch.Tensor:
        """Each micro-batch's loss of step ``step`` before ``backward``; returns the loss to use.

        Not called under the pipeline engine: DeepSpeed's 1F1B schedule computes the loss
        inside the engine, where no caller can reach it."""
        return loss

    def after_step(self, record: dict[str, Any], eng: Engine, ctx: ParallelContext) -> None:
        """After the optimizer step, before ``record`` (the step's metrics) is logged.

        May add keys to ``record``; rank 0's record is the one written to metrics.jsonl.
        Collectives are allowed (every rank calls this at the same point)."""

    def should_restore(self, what: str) -> bool:
        """Whether ``resume`` restores ``what`` (one of ``RESTORES``). Answering False is a
        negative control: a resume test must then fail, proving it can see that bug."""
        return True

    def after_resume(self, eng: Engine, ctx: ParallelContext, tag_dir: Path, resharded: bool) -> None:
        """After ``resume`` loaded the checkpoint ``tag_dir`` into ``eng`` (``resharded``: in
        another layout than the one that wrote it), before the first step. Collectives are
        allowed (every rank calls this at the same point)."""

    def on_checkpoint_write(self, step: int, rank: int, path: Path, state: Any) -> None:
        """Just before this rank writes ``state`` to the checkpoint file ``path``.

        An ``OSError`` raised here is that write failing (as a full disk does): the save
        records it and the ranks agree on the outcome (``checkpoint.on_disk_full``)."""

    def on_checkpoint_phase(self, step: int, rank: int, phase: str) -> None:
        """At a point of the save of step ``step`` (one of ``SAVE_PHASES``): ``before_commit``
        (every rank: all files written and agreed on, before they are hashed and the
        manifest and ``latest`` are written) or ``retention`` (rank 0, after the manifest of
        an old checkpoint was removed and before its directory is deleted)."""


NO_HOOKS = TrainHooks()
