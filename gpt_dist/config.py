"""One typed config tree per run, loaded from JSON, validated once.

The run config is a tree of dataclasses (torchtitan / nanotron style). A JSON file gives
the values; ``--set section.key=value`` overrides them. Loading rejects unknown keys,
wrong types, duplicate keys and undefined ``${ENV}`` references with one line that names
the key, before any process group exists or any file is written (RELIABILITY.md T12).
Derived values (padded vocabulary, data-parallel size, gradient accumulation) are
methods, never written back into the tree, so ``load -> dump -> load`` is the identity.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from gpt_dist.config_finetune import FinetuneConfig
from gpt_dist.config_kernels import KernelsConfig, kernels_for


class ConfigError(ValueError):
    """A config problem; the message is one line naming the key and the fix."""


# --------------------------------------------------------------------------- sections


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
    """GPT-1 fine-tuning (``gpt_dist/config_finetune.py``); absent for pretraining."""
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    """Fused kernels, each auto|on|off (``gpt_dist/config_kernels.py``); not architecture."""

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f for f in dataclasses.fields(Config)}

# --------------------------------------------------------------------------- loading

_ENV_RE = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"{key}: duplicate key in the JSON object")
        out[key] = value
    return out


def _interpolate(value: Any, where: str) -> Any:
    """Replace ``${env:VAR}`` in strings; an undefined variable is an error, never ''."""
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in os.environ:
                raise ConfigError(f"{where}: environment variable {m.group(1)} is not set")
            return os.environ[m.group(1)]
        return _ENV_RE.sub(sub, value)
    if isinstance(value, list):
        return [_interpolate(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{where}.{k}") for k, v in value.items()}
    return value


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {type(value).__name__}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = [n for n in names if n.startswith(key[:3])]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}.{key}: unknown key{hint}".lstrip("."))
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}".lstrip(".")) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, _interpolate(data, ""), "")


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``section.key=value`` (value parsed as JSON, then Python literal, else string)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected section.key=value")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if isinstance(value, tuple):  # data.split=90,10,0 is the string "90,10,0", not a tuple
            value = raw
    node = data
    for i, key in enumerate(keys[:-1]):
        if keys[0] == "deepspeed" or key in node or i == 0:
            node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {path}: {'.'.join(keys[: i + 1])} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a JSON config, apply ``--set`` overrides, and check types and local rules."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for item in overrides or []:
        apply_override(data, item)
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except TypeError as exc:  # a missing required field in a dataclass
        raise ConfigError(f"{path}: {exc}") from None


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (tmp + fsync + rename)."""
    from gpt_dist.utils import atomic_write_text

    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2, sort_keys=False) + "\n")


# --------------------------------------------------------------------------- cross-section checks


def validate(cfg: Config, world_size: int, *, check_paths: bool = True,
             check_device: bool | None = None) -> None:
    """Checks that need the world size or more than one section; run before any process group.

    ``check_paths`` also checks what must exist on this machine (shards, tokenizer, init
    export); ``check_device`` (default: the same as check_paths) that this machine's device
    runs ``training.precision``. The dry run plans a job for another machine and checks neither.
    """
    m, p, t = cfg.model, cfg.parallel, cfg.training
    if world_size % (p.tp * p.pp):
        raise ConfigError(
            f"parallel: world size {world_size} is not divisible by tp*pp = {p.tp}*{p.pp}; "
            "change parallel.tp/parallel.pp or the number of processes"
        )
    dp = cfg.dp_size(world_size)
    if m.n_head % p.tp:
        raise ConfigError(f"parallel.tp: model.n_head={m.n_head} is not divisible by tp={p.tp}")
    if m.n_layer % p.pp:
        raise ConfigError(f"parallel.pp: model.n_layer={m.n_layer} is not divisible by pp={p.pp}")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"training.global_batch_size: {t.global_batch_size} is not micro_batch_size "
            f"({t.micro_batch_size}) x grad accumulation x data parallel ({dp}); use a multiple "
            f"of {t.micro_batch_size * dp}"
        )
    if cfg.data.seq_len > m.n_ctx:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds model.n_ctx={m.n_ctx}")
    if p.sequence_parallel and cfg.data.seq_len % p.tp:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} must be divisible by tp={p.tp} for sequence parallelism")
    ds = cfg.deepspeed
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        if key in ds:
            raise ConfigError(f"deepspeed.{key}: set by gpt_dist from training/optimizer; remove it")
    if "fp16" in ds or "bf16" in ds:
        raise ConfigError("deepspeed.fp16/bf16: use training.precision instead; remove it")
    stage = cfg.zero_stage
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage: must be 0-3, got {stage}")
    if p.pp > 1 and stage >= 2:
        raise ConfigError(
            f"deepspeed.zero_optimization.stage: DeepSpeed's pipeline engine refuses ZeRO-{stage} "
            "with parallel.pp>1; use ZeRO-1 with pp, or ZeRO-3 with parallel.pp=1"
        )
    if p.pp > 1:
        accum = cfg.grad_accum_steps(world_size)
        if accum < p.pp:
            raise ConfigError(
                f"training.global_batch_size: {accum} micro-batches per step < pp={p.pp}; "
                f"raise global_batch_size to at least {t.micro_batch_size * dp * p.pp}"
            )
    if check_device is None:
        check_device = check_paths
    if check_device:
        from gpt_dist import device  # imports DeepSpeed, and only when a precision needs it

        problem = device.precision_problem(t.precision, t.device)
        if problem:
            raise ConfigError(f"training.precision: {problem}")
        kernels_for(cfg)  # an ``on`` this machine cannot run: one line naming the kernels key
    if check_paths:
        for i, prefix in enumerate(cfg.data.prefixes):
            if not (Path(prefix + ".idx").exists() or any(Path(prefix).parent.glob(Path(prefix).name + "_*.idx"))):
                raise ConfigError(f"data.prefixes[{i}]: no shards at {prefix} (.idx or _NNNNN.idx)")
        if cfg.data.tokenizer and not Path(cfg.data.tokenizer).exists():
            raise ConfigError(f"data.tokenizer: {cfg.data.tokenizer} does not exist")
        if cfg.checkpoint.init_from and not Path(cfg.checkpoint.init_from).exists():
            raise ConfigError(f"checkpoint.init_from: {cfg.checkpoint.init_from} does not exist")


def bubble_fraction(cfg: Config, world_size: int) -> float:
    """1F1B pipeline bubble: (pp - 1) / (micro-batches + pp - 1)."""
    pp, m = cfg.parallel.pp, cfg.grad_accum_steps(world_size)
    return (pp - 1) / (m + pp - 1)


#: Keys whose change makes a checkpoint incompatible (resume refuses with a diff).
ARCH_KEYS = ("arch", "n_layer", "n_head", "n_embd", "n_ctx", "vocab_size", "bias")


def arch_diff(saved: dict[str, Any], current: ModelConfig) -> list[str]:
    """The model keys that differ between a checkpoint's config and the current one."""
    now = dataclasses.asdict(current)
    return [f"model.{k}: checkpoint {saved.get(k)!r} != config {now[k]!r}" for k in ARCH_KEYS
            if saved.get(k) != now[k]]
