"""One typed config tree per run, loaded from JSON, validated once.

The run config is a tree of dataclasses (torchtitan / nanotron style). A JSON file gives
the values; ``--set section.key=value`` overrides them. Loading rejects unknown keys,
wrong types, duplicate keys and undefined ``${env:VAR}`` references with one line that names
the key, before any process group exists or any file is written (RELIABILITY.md T12).
Derived values (padded vocabulary, data-parallel size, gradient accumulation, the step
schedule) are methods, never written back into the tree, so ``load -> dump -> load`` is the
identity.

The package, from the bottom up (each module imports only those above it):

    errors.py      ConfigError
    sections.py    model, parallel, optimizer, schedule, data, training, checkpoint, logging, run
    kernels.py     kernels (auto|on|off per fused kernel) -> KernelChoice
    evaluation.py  eval (launch/evaluate.py's options; absent for training)
    schedule.py    Schedule: the step plan derived from the sections (and the data size)
    finetune.py    finetune (GPT-1 fine-tuning; absent for pretraining), its Schedule
    tree.py        Config, the root, with its derived values
    loader.py      JSON + --set -> Config; dump
    checks.py      rules spanning sections or needing the world size; kernels_for
"""

from gpt_dist.config.checks import ARCH_KEYS, arch_diff, bubble_fraction, kernels_for, validate
from gpt_dist.config.errors import ConfigError
from gpt_dist.config.evaluation import EvalConfig
from gpt_dist.config.finetune import TASKS, FinetuneConfig
from gpt_dist.config.kernels import TRITON_KERNELS, KernelChoice, KernelsConfig
from gpt_dist.config.loader import (
    apply_override,
    config_from_dict,
    dump_config,
    load_config,
    parse_value,
    read_config_file,
)
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
from gpt_dist.config.tree import SECTIONS, Config

__all__ = [
    "ARCH_KEYS", "SECTIONS", "TASKS", "TRITON_KERNELS", "CheckpointConfig", "Config", "ConfigError",
    "DataConfig", "EvalConfig", "FinetuneConfig", "KernelChoice", "KernelsConfig", "LoggingConfig",
    "ModelConfig", "OptimizerConfig", "ParallelConfig", "RunSection", "Schedule", "ScheduleConfig",
    "TrainingConfig", "apply_override", "arch_diff", "bubble_fraction", "config_from_dict", "dump_config",
    "kernels_for", "load_config", "parse_value", "read_config_file", "validate",
]
