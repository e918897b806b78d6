"""The root of the run config: one typed tree of sections per run.

Derived values (run directory, data-parallel size, gradient accumulation, ZeRO stage, the
sequence length, the step schedule) are methods, never written back into the tree, so
``load -> dump -> load`` is the identity and no section changes after validation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt_dist.config.evaluation import EvalConfig
from gpt_dist.config.finetune import FinetuneConfig
from gpt_dist.config.kernels import KernelsConfig
from gpt_dist.config.schedule import Schedule
from gpt_dist.config.sections import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RunSection,
    ScheduleConfig,
    TrainingConfig,
)


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Passed through to DeepSpeed (zero_optimization, offload, ...); batch keys are generated."""
    finetune: FinetuneConfig | None = None
    """GPT-1 fine-tuning (``gpt_dist/config/finetune.py``); absent for pretraining."""
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    """Fused kernels, each auto|on|off (``gpt_dist/config/kernels.py``); not architecture."""
    eval: EvalConfig | None = None
    """Zero-shot evaluation by ``launch/evaluate.py`` (``gpt_dist/config/evaluation.py``); absent
    for training runs."""

    # ------------------------------------------------------------------ derived values
    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir.replace("${name}", self.run.name))

    def dp_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tp * self.parallel.pp)

    def grad_accum_steps(self, world_size: int) -> int:
        return self.training.global_batch_size // (
            self.training.micro_batch_size * self.dp_size(world_size)
        )

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))

    @property
    def staged_pipeline(self) -> bool:
        """pp > 1 run by one DeepSpeed engine per stage (``parallel.pipeline_engine``)."""
        engine = self.parallel.pipeline_engine
        return self.parallel.pp > 1 and (engine == "stages" or (engine == "auto" and self.zero_stage >= 2))

    @property
    def optimizer_offloaded(self) -> bool:
        """ZeRO-Offload moves the optimizer to the CPU or NVMe (DeepSpeedCPUAdam, no FusedAdam)."""
        offload = self.deepspeed.get("zero_optimization", {}).get("offload_optimizer", {})
        return offload.get("device") in ("cpu", "nvme")

    @property
    def sequence_length(self) -> int:
        """Tokens per training sequence: the task's (finetune.max_len, default model.n_ctx) when
        fine-tuning, data.seq_len when pretraining."""
        if self.finetune is not None:
            return self.finetune.max_len or self.model.n_ctx
        return self.data.seq_len

    @property
    def sequence_length_key(self) -> str:
        """The key that sets ``sequence_length``, for error messages."""
        return "finetune.max_len" if self.finetune is not None else "data.seq_len"

    def run_schedule(self, n_train_examples: int | None = None) -> Schedule:
        """The step plan (``schedule.py``): fine-tuning's from the number of training examples;
        without it, the sections as written (pretraining, and benchmarks that drive a
        fine-tuning step by hand)."""
        if n_train_examples is not None and self.finetune is not None:
            return self.finetune.schedule(n_train_examples, self.training, self.checkpoint)
        return Schedule.of_sections(self.training, self.schedule, self.checkpoint)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f for f in dataclasses.fields(Config)}
