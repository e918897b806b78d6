"""The ``eval`` section of the run config: what ``launch/evaluate.py`` evaluates, and how.

``launch/evaluate.py`` takes ``--config FILE`` and ``--set eval.KEY=VALUE`` like every other
entry point; its short flags (``--model``, ``--tasks``, ``--tp``, ``--pp``, ``--out``, ...) are
aliases of these keys (``gpt_dist/eval/driver.py``). A config file for evaluation may hold
only this section; a pretraining or fine-tuning config without it is unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gpt_dist.config.errors import ConfigError


@dataclass
class EvalConfig:
    model: str = ""
    """Native or Hugging Face export, local HF GPT-2 directory, or run directory (required)."""
    tasks: str = ""
    """Comma-separated task names or KIND:PATH (docs/eval.md; required)."""
    data_dir: str | None = None
    """Folder holding NAME.jsonl for named tasks."""
    out: str | None = None
    """Results JSON (default: print only)."""
    tokenizer: str | None = None
    """Tokenizer directory (default: the model's own)."""
    tp: int = 1
    """Tensor-parallel size (under torchrun/deepspeed)."""
    pp: int = 1
    """Pipeline-parallel size; data parallel = world / (tp * pp)."""
    batch_size: int = 8
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    limit: int | None = None
    """First N examples of each task (None: all)."""
    rolling_context: int = 1
    """Rolling perplexity: context tokens kept per window (1 = lm-eval's scheme)."""
    reuse_context: bool = True
    """Score a multiple-choice example's choices on its context's cached keys/values
    (false: one full pass per choice; flag ``--no-reuse-context``)."""
    bootstrap_iters: int = 100_000
    """Bootstrap resamples for the perplexity stderr (lm-eval's default)."""
    all_checkpoints: bool = False
    """Evaluate every committed checkpoint of a run directory."""
    sweep_dir: str | None = None
    """With all_checkpoints: the TensorBoard + PNG folder (default: RUN/eval_sweep)."""
    overlap_with: list[str] | None = None
    """Training shard prefixes: report n-gram overlap and clean-subset metrics."""
    overlap_n: int = 8
    """N-gram length in tokens (GPT-2: 8; more for small vocabularies, see docs/eval.md)."""
    overlap_threshold: float = 0.0
    """An example overlaps when more than this share of its n-grams is found (0: any)."""
    overlap_cache: str | None = None
    """Folder for the cached Bloom filter."""
    overlap_fp_rate: float = 1e-4
    """Bloom filter false-positive rate."""
    harness: Literal["builtin", "lm-eval"] = "builtin"
    include_path: str | None = None
    """With harness lm-eval: a folder of task YAMLs."""
    progress: bool = True
    """Progress bars (flag ``--no-progress``)."""
    per_example: bool = False
    """Keep per-example results in ``out``."""

    def __post_init__(self) -> None:
        for key in ("model", "tasks"):
            if not getattr(self, key).strip():
                raise ConfigError(f"eval.{key}: required (--{key} or --set eval.{key}=...)")
        for key in ("tp", "pp", "batch_size", "rolling_context", "overlap_n"):
            if getattr(self, key) < 1:
                raise ConfigError(f"eval.{key}: must be >= 1, got {getattr(self, key)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"eval.limit: must be >= 1, got {self.limit}")
        if self.bootstrap_iters < 0:
            raise ConfigError(f"eval.bootstrap_iters: must be >= 0, got {self.bootstrap_iters}")
        if not 0.0 <= self.overlap_threshold <= 1.0:
            raise ConfigError(f"eval.overlap_threshold: must be in [0, 1], got {self.overlap_threshold}")
        if not 0.0 < self.overlap_fp_rate < 1.0:
            raise ConfigError(f"eval.overlap_fp_rate: must be in (0, 1), got {self.overlap_fp_rate}")
