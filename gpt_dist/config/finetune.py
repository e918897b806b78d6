"""The ``finetune`` section of the run config (GPT-1 supervised fine-tuning, §3.2).

A section of the same typed tree, loaded and checked by the same strict loader (unknown keys,
types, one-line errors naming the key). A config without this section is a pretraining run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from gpt_dist.config.errors import ConfigError
from gpt_dist.config.schedule import Schedule
from gpt_dist.config.sections import CheckpointConfig, TrainingConfig

TASKS = ("classification", "entailment", "similarity", "multiple_choice")


@dataclass
class FinetuneConfig:
    task: Literal["classification", "entailment", "similarity", "multiple_choice"] = "classification"
    """GPT-1 Figure 1's input transformations: classification {text,label}; entailment
    {premise,hypothesis,label}; similarity {text_a,text_b,label|score} (both orderings, added);
    multiple_choice {context,choices,label} (one score per choice, softmax over choices)."""
    train_file: str = ""
    """JSONL, one example per line."""
    valid_file: str | None = None
    test_file: str | None = None
    """Labelled or not: predictions go to RUN_DIR/test_predictions.jsonl."""
    label_names: list[str] | None = None
    """String labels in class order (labels may also be given as ints 0..n-1)."""
    num_labels: int | None = None
    """Number of classes when labels are ints and label_names is not given."""
    regression: bool = False
    """similarity only: the label is a real-valued "score" (one output, mean squared error)."""
    num_choices: int | None = None
    """multiple_choice: choices per example (default: read from the training file)."""
    lm_coef: float = 0.5
    """lambda in L3 = L2 + lambda * L1 (the auxiliary next-token loss); 0 switches it off."""
    classifier_dropout: float = 0.1
    epochs: int = 3
    max_len: int | None = None
    """Longest input in tokens, transformation tokens included (default: model.n_ctx)."""
    truncate: Literal["left", "right"] = "right"
    """Which end of the variable text (text, premise, each similarity text, MC context) is cut
    when an input is too long: right keeps the start (as GPT-1's code does); left keeps the end,
    the words nearest the question/choice."""
    warmup_fraction: float = 0.002
    """Linear warmup over this share of all fine-tuning steps, then linear decay (GPT-1: 0.2%)."""
    metric: str | None = None
    """Validation metric that selects the best checkpoint (default: accuracy, pearson for regression)."""
    eval_interval: int | None = None
    """Also validate every N steps (validation always runs at the end of every epoch)."""
    cache_dir: str | None = None
    """Tokenized task files (default: RUN_DIR/task_cache)."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"finetune.epochs: must be >= 1, got {self.epochs}")
        if self.lm_coef < 0:
            raise ConfigError(f"finetune.lm_coef: must be >= 0, got {self.lm_coef}")
        if not 0.0 <= self.classifier_dropout < 1.0:
            raise ConfigError(f"finetune.classifier_dropout: must be in [0, 1), got {self.classifier_dropout}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"finetune.warmup_fraction: must be in [0, 1), got {self.warmup_fraction}")
        if self.regression and self.task != "similarity":
            raise ConfigError(f"finetune.regression: only for task similarity, not {self.task}")
        if self.task != "multiple_choice" and not self.regression and self.classes() < 2:
            raise ConfigError(f"finetune.label_names: task {self.task} needs label_names or num_labels >= 2")
        if self.label_names is not None and self.num_labels is not None and len(self.label_names) != self.num_labels:
            raise ConfigError(f"finetune.num_labels: {self.num_labels} != {len(self.label_names)} label_names")
        if self.num_choices is not None and self.num_choices < 2:
            raise ConfigError(f"finetune.num_choices: must be >= 2, got {self.num_choices}")
        if self.metric is not None and self.metric not in self.metrics():
            raise ConfigError(f"finetune.metric: {self.metric!r} is not reported for this task; "
                         f"choose one of {list(self.metrics())}")
        if self.eval_interval is not None and self.eval_interval < 1:
            raise ConfigError(f"finetune.eval_interval: must be >= 1, got {self.eval_interval}")

    def classes(self) -> int:
        if self.label_names is not None:
            return len(self.label_names)
        return self.num_labels or 0

    def head_outputs(self) -> int:
        """Width of W_y: classes; 1 for a regression score and for multiple choice."""
        if self.task == "multiple_choice" or self.regression:
            return 1
        return self.classes()

    def metrics(self) -> tuple[str, ...]:
        """What validation reports (``gpt_dist.finetune.metrics.metric_names``, tested equal)."""
        if self.regression:
            return ("pearson", "spearman")
        if self.task == "multiple_choice":
            return ("accuracy",)
        f1 = "f1" if self.classes() == 2 else "f1_macro"
        return ("accuracy", f1) if self.task == "similarity" else ("accuracy", f1, "mcc")

    def selection_metric(self) -> str:
        return self.metric or self.metrics()[0]

    def schedule(self, n_train: int, training: TrainingConfig, checkpoint: CheckpointConfig) -> Schedule:
        """The step plan for ``n_train`` training examples: ``epochs`` x (examples // global
        batch) steps; linear warmup over ``warmup_fraction`` of them, then linear decay to
        optimizer.min_lr (GPT-1: 0.2%, to 0); validation and a checkpoint at the end of every
        epoch at least (more often with ``eval_interval`` / ``checkpoint.save_interval``)."""
        steps_per_epoch = n_train // training.global_batch_size
        if steps_per_epoch < 1:
            raise ConfigError(f"training.global_batch_size: {training.global_batch_size} exceeds the {n_train} "
                              f"training examples of {self.train_file}")
        total = self.epochs * steps_per_epoch
        return Schedule(train_steps=total, warmup_steps=math.ceil(self.warmup_fraction * total), decay="linear",
                        decay_steps=total, eval_interval=min(self.eval_interval or steps_per_epoch, steps_per_epoch),
                        save_interval=min(checkpoint.save_interval, steps_per_epoch), epoch_steps=steps_per_epoch)
