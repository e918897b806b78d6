"""The pretraining sections of the run config (one dataclass each), checked on construction.

Each ``__post_init__`` checks the rules local to its section, so a section that exists is
valid; rules spanning sections or needing the world size are in ``checks.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from gpt_dist.config.errors import ConfigError


@dataclass
class ModelConfig:
    arch: Literal["gpt1", "gpt2"] = "gpt2"
    """gpt1: post-LN blocks, no final LN, context 512. gpt2: pre-LN, final LN, context 1024."""
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_ctx: int = 1024
    """Learned position embeddings: the longest sequence the model accepts."""
    vocab_size: int = 50257
    """The tokenizer's real vocabulary; the embedding is padded (see padded_vocab_size)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times tp (Megatron's rule: fast GEMMs, even TP split)."""
    dropout: float = 0.1
    """Residual and embedding dropout."""
    attn_dropout: float = 0.1
    init_std: float = 0.02
    ln_eps: float = 1e-5
    bias: bool = True

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "n_ctx", "vocab_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}: must be > 0, got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd: {self.n_embd} is not divisible by model.n_head={self.n_head}"
            )
        for key in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.{key}: must be in [0, 1), got {getattr(self, key)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def padded_vocab_size(self, tp: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (megatron-core Column/RowParallelLinear, vocab-parallel embedding)."""
    pp: int = 1
    """Pipeline-parallel size (DeepSpeed PipelineModule). Data parallel = world / (tp * pp)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism inside the TP group (needs tp > 1)."""
    activation_checkpointing: Literal["none", "full"] = "none"
    checkpoint_every: int = 1
    """With activation_checkpointing=full: recompute every k-th block (1 = every block)."""
    partition_activations: bool = False
    """Split checkpointed activations across TP ranks (DeepSpeed checkpointing)."""
    pipeline_partition: Literal["parameters", "uniform", "type:Block"] = "parameters"
    pipeline_engine: Literal["auto", "deepspeed", "stages"] = "auto"
    """What runs the pipeline when pp > 1. ``deepspeed``: DeepSpeed's ``PipelineEngine`` (ZeRO-0/1
    only: it refuses ZeRO-2/3). ``stages``: one DeepSpeed engine per stage with ZeRO over the
    stage's data-parallel group, driven by torch's 1F1B schedule (ZeRO-1/2/3;
    ``gpt_dist/training/stages.py``). ``auto``: ``stages`` under ZeRO-2/3, else ``deepspeed``.
    Why both stay (BENCHMARKS.md, "Pipeline under ZeRO-3"): at ZeRO-1 the two measured the same
    step time on the CPU (1.00x tiny, 0.96-1.03x small), but only DeepSpeed's engine runs ZeRO-0
    and fp16 (the stages engine refuses both), and existing pp checkpoints hold its per-layer
    files (a native resume needs the same engine; the layout-free state crosses between them)."""
    pipeline_schedule: Literal["1f1b", "gpipe"] = "1f1b"
    """The ``stages`` engine's schedule (torch.distributed.pipelining): 1F1B keeps at most pp
    micro-batches' activations per stage; GPipe runs every forward, then every backward."""
    stage_recompute: bool = False
    """The ``stages`` engine: every stage but the last runs each micro-batch's forward without
    keeping its graph and again right before its backward. One graph per stage at a time:
    ZeRO-3's gathered working set stays bounded on the first stage (which otherwise keeps its
    whole stage gathered through 1F1B's cool-down), for one more forward and one more all-gather
    of the stage per micro-batch (docs/parallelism.md, BENCHMARKS.md)."""

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key}: must be >= 1, got {getattr(self, key)}")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel: needs parallel.tp > 1; set it false")


@dataclass
class OptimizerConfig:
    lr: float = 6e-4
    min_lr: float = 0.0
    weight_decay: float = 0.1
    """Decoupled (AdamW) decay on weight matrices only; biases, norms and positions are exempt."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr: must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optimizer.min_lr: must be in [0, lr={self.lr}], got {self.min_lr}")


@dataclass
class ScheduleConfig:
    warmup_steps: int = 2000
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    decay_steps: int | None = None
    """Steps from start to the end of decay; default: training.train_steps."""


@dataclass
class DataConfig:
    prefixes: list[str] = field(default_factory=list)
    """Shard prefixes written by data_tools/preprocess.py (PREFIX or PREFIX_00000)."""
    weights: list[float] | None = None
    """Blend weights, one per prefix (default: by size)."""
    tokenizer: str = ""
    """Tokenizer directory (data_tools/train_tokenizer.py or GPT-2 encoder.json + vocab.bpe)."""
    split: str = "969,30,1"
    """train,valid,test proportions of the documents (megatron-core convention)."""
    seq_len: int = 1024
    num_workers: int = 0
    cache_dir: str | None = None
    """Where megatron-core's sample-index caches go (default: RUN_DIR/data_cache)."""
    verify_shards: bool = False
    """Check every shard's sha256 at start (length is always checked)."""

    def __post_init__(self) -> None:
        if self.seq_len <= 0:
            raise ConfigError(f"data.seq_len: must be > 0, got {self.seq_len}")
        if self.weights is not None and len(self.weights) != len(self.prefixes):
            raise ConfigError(
                f"data.weights: {len(self.weights)} weights for {len(self.prefixes)} prefixes"
            )
        parts = self.split.split(",")
        if len(parts) != 3 or not all(re.fullmatch(r"\d+(\.\d+)?", p.strip()) for p in parts):
            raise ConfigError(f"data.split: expected 'train,valid,test' like '969,30,1', got {self.split!r}")


@dataclass
class TrainingConfig:
    seed: int = 1234
    train_steps: int = 1000
    micro_batch_size: int = 4
    """Sequences per rank per forward pass."""
    global_batch_size: int = 32
    """Sequences per optimizer step = micro_batch_size * grad accumulation * data-parallel size."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_interval: int = 1000
    eval_steps: int = 10
    max_consecutive_skips: int = 3
    """Stop (exit code 17) after this many consecutive non-finite steps."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms: bit-exact resume (CPU tests set it)."""
    eval_tasks: list[str] = field(default_factory=list)
    """Zero-shot tasks at every evaluation (gpt_dist/eval: lambada, wikitext, hellaswag, KIND:PATH)."""
    eval_tasks_dir: str | None = None
    eval_tasks_limit: int | None = None
    """First N examples of each eval task (None: all)."""

    def __post_init__(self) -> None:
        for key in ("train_steps", "micro_batch_size", "global_batch_size", "eval_interval"):
            if getattr(self, key) < 1:
                raise ConfigError(f"training.{key}: must be >= 1, got {getattr(self, key)}")


@dataclass
class CheckpointConfig:
    save_interval: int = 1000
    keep_last: int = 3
    """Committed checkpoints to keep (the newest is never deleted)."""
    load: Literal["auto", "none"] = "auto"
    """auto: resume from the run's newest committed checkpoint if there is one."""
    on_corrupt: Literal["fail", "fallback"] = "fail"
    """A checkpoint that fails verification: stop, or fall back to the previous committed one."""
    init_from: str | None = None
    """An export (native or Hugging Face) to initialise weights from, in any parallel layout."""
    on_disk_full: Literal["fail", "continue"] = "fail"
    """A save that fails for lack of space: stop the run, or drop the save and keep training."""
    layout_free: bool = True
    """Also write the layout-free state (one file per parameter: fp32 weight, Adam moments), so
    the checkpoint resumes in any parallel layout (docs/resharding.md); 12 bytes per parameter."""


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    peak_tflops: float | None = None
    """Peak dense TFLOP/s per device for MFU (default: looked up from the GPU name, else none)."""


@dataclass
class RunSection:
    name: str = "run"
    dir: str = "runs/${name}"
    """Run directory: checkpoints, TensorBoard logs, metrics.jsonl, the resolved config."""
