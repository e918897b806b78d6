"""The step plan of a run, derived from the config: never written back into it.

Pretraining's plan is the ``training``, ``schedule`` and ``checkpoint`` sections as written.
Fine-tuning's depends on the size of the training set as well (GPT-1 §4.1: ``finetune.epochs``
over the data, linear warmup over ``finetune.warmup_fraction`` of the steps, then linear decay;
validation and a checkpoint at the end of every epoch at least), so it is computed once, after
the task files are read and before any process group exists (``FinetuneConfig.schedule``), and
passed to whatever needs it: the LR schedule, the loop, the logger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gpt_dist.config.sections import CheckpointConfig, ScheduleConfig, TrainingConfig


@dataclass(frozen=True)
class Schedule:
    train_steps: int
    warmup_steps: int
    """Linear warmup to optimizer.lr over these steps."""
    decay: Literal["cosine", "linear", "constant"]
    decay_steps: int
    """Steps from start to the end of decay (then optimizer.min_lr)."""
    eval_interval: int
    """Validate every this many steps (and at the last step)."""
    save_interval: int
    """Checkpoint every this many steps (and at the last step, and at a signal)."""
    epoch_steps: int | None = None
    """Fine-tuning: steps per epoch; validation and a checkpoint at every epoch's end as well."""

    def evaluates_at(self, step: int) -> bool:
        """Validation after ``step``: every ``eval_interval``, at every epoch's end, at the last."""
        return step % self.eval_interval == 0 or step == self.train_steps or self._epoch_end(step)

    def saves_at(self, step: int) -> bool:
        """A checkpoint after ``step``: every ``save_interval``, at every epoch's end, at the last."""
        return step % self.save_interval == 0 or step == self.train_steps or self._epoch_end(step)

    def _epoch_end(self, step: int) -> bool:
        return self.epoch_steps is not None and step % self.epoch_steps == 0

    @classmethod
    def of_sections(cls, training: TrainingConfig, schedule: ScheduleConfig,
                    checkpoint: CheckpointConfig) -> Schedule:
        """The plan the sections state (pretraining)."""
        return cls(train_steps=training.train_steps, warmup_steps=schedule.warmup_steps, decay=schedule.decay,
                   decay_steps=schedule.decay_steps or training.train_steps,
                   eval_interval=training.eval_interval, save_interval=checkpoint.save_interval)

    def describe(self) -> str:
        return (f"schedule: {self.train_steps} steps, warmup {self.warmup_steps}, {self.decay} decay to step "
                f"{self.decay_steps}, validation every {self.eval_interval}, checkpoint every {self.save_interval}"
                + (f" and at every epoch's end ({self.epoch_steps} steps)" if self.epoch_steps else ""))
