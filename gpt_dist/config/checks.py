"""Checks and derived numbers that span sections or need the world size; run before any
process group exists."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from gpt_dist.config.errors import ConfigError
from gpt_dist.config.kernels import KernelChoice
from gpt_dist.config.sections import ModelConfig
from gpt_dist.config.tree import Config
from gpt_dist.device import precision_problem, resolve_device


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
    seq, seq_key = cfg.sequence_length, cfg.sequence_length_key
    if seq > m.n_ctx:
        raise ConfigError(f"{seq_key}: {seq} exceeds model.n_ctx={m.n_ctx}")
    if p.sequence_parallel and seq % p.tp:
        raise ConfigError(f"{seq_key}: {seq} must be divisible by tp={p.tp} for sequence parallelism")
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
    if p.pp > 1 and stage >= 2 and p.pipeline_engine == "deepspeed":
        raise ConfigError(
            f"parallel.pipeline_engine: DeepSpeed's pipeline engine refuses ZeRO-{stage}; "
            "use pipeline_engine 'stages' (or 'auto') for pp>1 with ZeRO-2/3"
        )
    if p.stage_recompute and not cfg.staged_pipeline:
        raise ConfigError("parallel.stage_recompute: only the 'stages' pipeline engine (pp>1 under "
                          "ZeRO-2/3, or parallel.pipeline_engine 'stages') recomputes stages; remove it")
    if p.pipeline_schedule != "1f1b" and not cfg.staged_pipeline:
        raise ConfigError("parallel.pipeline_schedule: only the 'stages' pipeline engine (pp>1 under "
                          "ZeRO-2/3, or parallel.pipeline_engine 'stages') has a choice; remove it")
    if cfg.staged_pipeline:
        if stage == 0:
            raise ConfigError("parallel.pipeline_engine: 'stages' needs ZeRO-1/2/3 "
                              "(deepspeed.zero_optimization.stage); use 'deepspeed' or 'auto' at ZeRO-0")
        if t.precision == "fp16":
            raise ConfigError("training.precision: fp16 with parallel.pp>1 under ZeRO-2/3 (pipeline_engine "
                              "'stages') is not supported (its loss scaler would scale every stage's "
                              "incoming gradient again); use bf16 or fp32")
        if cfg.optimizer_offloaded:
            raise ConfigError("deepspeed.zero_optimization.offload_optimizer: not supported with "
                              "parallel.pp>1 under ZeRO-2/3 (pipeline_engine 'stages')")
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
        problem = precision_problem(t.precision, t.device)  # imports DeepSpeed only when needed
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


def bubble_fraction(pp: int, micro_batches: int) -> float:
    """1F1B pipeline bubble: (pp - 1) / (micro-batches + pp - 1)."""
    return (pp - 1) / (micro_batches + pp - 1)


#: Keys whose change makes a checkpoint incompatible (resume refuses with a diff).
ARCH_KEYS = ("arch", "n_layer", "n_head", "n_embd", "n_ctx", "vocab_size", "bias")


def arch_diff(saved: dict[str, Any], current: ModelConfig) -> list[str]:
    """The model keys that differ between a checkpoint's config and the current one."""
    now = dataclasses.asdict(current)
    return [f"model.{k}: checkpoint {saved.get(k)!r} != config {now[k]!r}" for k in ARCH_KEYS
            if saved.get(k) != now[k]]


def kernels_for(cfg: Config, device: str | None = None) -> KernelChoice:
    """The resolved switch of a run config (``device`` defaults to ``training.device``, auto
    resolved as ParallelContext does)."""
    return cfg.kernels.resolve(resolve_device(device or cfg.training.device), cfg.training.precision,
                               attn_dropout=cfg.model.attn_dropout, offload=cfg.optimizer_offloaded)
