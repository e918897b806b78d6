"""Model + optimizer + LR schedule wrapped in a DeepSpeed engine.

The DeepSpeed config is generated from the run config (batch keys, precision, clipping)
and merged with the config's ``deepspeed`` section, which is passed through untouched, so
ZeRO stages, offload to CPU/NVMe and every other DeepSpeed option work as DeepSpeed
documents them. Nobody hand-writes a second DeepSpeed JSON.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gpt_dist import deepspeed_compat
from gpt_dist.config import Config, OptimizerConfig, Schedule, kernels_for
from gpt_dist.model.build import build_model, configure_activation_checkpointing
from gpt_dist.parallel import ParallelContext
from gpt_dist.pipeline import StageModule
from gpt_dist.training.stages import StagedPipelineEngine

# DeepSpeed sizes its ZeRO buckets (5e8 elements: a 2 GB buffer each) for GPUs. On a CPU those
# allocations dominate a small run, so CPU runs default to 5e6 unless the config sets them.
_CPU_BUCKETS = {"reduce_bucket_size": 5_000_000, "allgather_bucket_size": 5_000_000,
                "stage3_prefetch_bucket_size": 5_000_000}


def deepspeed_config(cfg: Config, world_size: int, device: str = "cuda") -> dict[str, Any]:
    """The DeepSpeed JSON: generated batch/precision keys + the passed-through section.

    ``device`` is the resolved device type: on ``"cpu"`` the ZeRO bucket sizes the config
    leaves unset default to 5e6 elements instead of DeepSpeed's GPU-sized 5e8."""
    t = cfg.training
    ds = copy.deepcopy(cfg.deepspeed)
    ds.update(
        train_batch_size=t.global_batch_size,
        train_micro_batch_size_per_gpu=t.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum_steps(world_size),
        gradient_clipping=cfg.optimizer.grad_clip,
        steps_per_print=ds.get("steps_per_print", 10**9),  # we log ourselves
    )
    ds.setdefault("wall_clock_breakdown", False)
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                      "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    ds.setdefault("zero_optimization", {"stage": 0})
    if device == "cpu":
        ds["zero_optimization"] = {**_CPU_BUCKETS, **ds["zero_optimization"]}
    if cfg.staged_pipeline:
        # one engine per stage (training/stages.py): the pipeline schedule owns the micro-batches
        # and calls step() once per global step (a top-level DeepSpeed key)
        ds["managed_gradient_accumulation"] = False
    elif cfg.parallel.pp > 1 and cfg.parallel.sequence_parallel:
        # The pipeline engine sends 1/tp of each inter-stage activation per TP rank and
        # all-gathers it on arrival, assuming it is the same on every TP rank. Under sequence
        # parallelism each rank holds its own sequence slice (already 1/tp): send it whole.
        ds["pipeline"] = {**ds.get("pipeline", {}), "pipe_partitioned": False, "grad_partitioned": False}
    return ds


def lr_lambda(opt: OptimizerConfig, schedule: Schedule) -> Any:
    """Linear warmup to optimizer.lr, then cosine/linear decay to min_lr (a multiplier)."""
    warm, total, decay = schedule.warmup_steps, schedule.decay_steps, schedule.decay
    floor = opt.min_lr / opt.lr

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if decay == "constant" or total <= warm:
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if decay == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)

    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay weight matrices and embeddings; never biases or LayerNorm gains."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(o: OptimizerConfig, groups: list[dict[str, Any]], device: torch.device, *,
                    offloaded: bool, fused_adam: bool) -> torch.optim.Optimizer:
    """AdamW of the ``optimizer`` section: DeepSpeed's CPU Adam when ZeRO-Offload moves the
    optimizer (``Config.optimizer_offloaded``), else the fused one when the ``kernels`` switch
    resolves on (``kernels_for(cfg, device).fused_adam``), else torch's."""
    if offloaded:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # ZeRO-Offload needs DeepSpeed's CPU Adam

        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True)
    if fused_adam:  # DeepSpeed's FusedAdam, torch-compatible state
        # deepspeed.ops (FusedAdam and its op builders) at import: only when the fused optimizer is on
        from gpt_dist.kernels.optim import FusedAdamW

        deepspeed_compat.register_zero_optimizer(FusedAdamW)
        return FusedAdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=device.type == "cuda")


class NonFiniteGuard:
    """Skip the optimizer update on every rank when any rank has a non-finite gradient.

    DeepSpeed skips steps only under fp16 (its loss scaler). For fp32/bf16 the guard gates the
    *inner* optimizer's ``step`` (``deepspeed_compat.gate_optimizer_step``), which DeepSpeed
    calls on every rank with the final (reduced, ZeRO-partitioned) gradients attached, under
    both the plain and the pipeline engine. A
    flag is all-reduced over all ranks first, so a NaN on one rank skips the update on all
    (a skip on one rank only would desynchronise the replicas). A skipped update leaves the
    weights and Adam moments untouched; DeepSpeed still zeroes the gradients and counts the
    step (README, "Non-finite loss").
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.optimizer, self.device = optimizer, device
        self.skipped = False
        deepspeed_compat.gate_optimizer_step(optimizer, self._all_finite)

    def _all_finite(self) -> bool:
        """True when every rank's gradients are finite (a collective: every rank calls it)."""
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        bad = torch.zeros(1, device=self.device)
        if grads:
            bad = (~torch.stack([g.isfinite().all() for g in grads]).all()).float().reshape(1).to(self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            self.skipped = True
            return False
        return True


@dataclass
class Engine:
    """What the loop needs: the DeepSpeed engine, the plain optimizer inside it, the guard."""

    ds: Any
    """deepspeed.DeepSpeedEngine; with pp > 1 its PipelineEngine, or under ZeRO-2/3
    ``stages.StagedPipelineEngine`` (the same interface where the loop uses it)"""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ds_config: dict[str, Any]
    guard: NonFiniteGuard

    @property
    def is_pipeline(self) -> bool:
        return hasattr(self.ds, "train_batch")


def build_engine(cfg: Config, ctx: ParallelContext, model: nn.Module | None = None,
                 schedule: Schedule | None = None) -> Engine:
    """``schedule``: the run's step plan (default: the config's sections as written,
    ``Config.run_schedule``); fine-tuning passes the one derived from its data size."""
    import deepspeed

    ds_config = deepspeed_config(cfg, ctx.world_size, ctx.device.type)
    if model is None:
        model = build_model(cfg, ctx, ds_config)
    offloaded = cfg.optimizer_offloaded
    optimizer = build_optimizer(cfg.optimizer, param_groups(model, cfg.optimizer.weight_decay), ctx.device,
                                offloaded=offloaded,
                                fused_adam=not offloaded and kernels_for(cfg, ctx.device.type).fused_adam)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optimizer, schedule or cfg.run_schedule()))
    guard = NonFiniteGuard(optimizer, ctx.device)  # after LambdaLR, which re-wraps .step
    if cfg.staged_pipeline:
        return _build_staged(cfg, ctx, model, optimizer, scheduler, ds_config, guard)
    ds_engine, _, _, ds_sched = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        mpu=ctx.mpu() if ctx.pp == 1 else None, dist_init_required=False)
    deepspeed_compat.keep_fp32_clip_norm(ds_engine)
    return Engine(ds=ds_engine, optimizer=optimizer, scheduler=ds_sched, ds_config=ds_config,
                  guard=guard)


def _build_staged(cfg: Config, ctx: ParallelContext, pipe: nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: Any, ds_config: dict[str, Any], guard: NonFiniteGuard) -> Engine:
    """pp > 1 under ZeRO-2/3: this rank's stage in a plain DeepSpeed engine whose ZeRO
    partitions over the stage's data-parallel group (``training/stages.py``)."""
    import deepspeed



    if cfg.zero_stage == 3:
        deepspeed_compat.skip_zero3_trace_check()
    if cfg.parallel.stage_recompute and cfg.parallel.activation_checkpointing != "full":
        configure_activation_checkpointing(cfg.parallel, ctx)  # the RNG tracker the recompute restores
    stage = StageModule(pipe, ctx.is_last_stage)
    ds_engine, _, _, ds_sched = deepspeed.initialize(
        model=stage, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        mpu=ctx.stage_mpu(), dist_init_required=False)
    if cfg.zero_stage == 3:
        deepspeed_compat.zero3_norm_by_tp_rank(ds_engine, ctx.tp_rank)
    dtype = torch.bfloat16 if cfg.training.precision == "bf16" else torch.float32
    staged = StagedPipelineEngine(ds_engine, ctx, cfg.grad_accum_steps(ctx.world_size), cfg.zero_stage,
                                  hidden=cfg.model.n_embd, sequence_parallel=cfg.parallel.sequence_parallel,
                                  dtype=dtype, schedule=cfg.parallel.pipeline_schedule,
                                  recompute=cfg.parallel.stage_recompute)
    return Engine(ds=staged, optimizer=optimizer, scheduler=ds_sched, ds_config=ds_config, guard=guard)
