"""Pipeline parallelism under ZeRO-2/3: one DeepSpeed engine per stage, driven by
``torch.distributed.pipelining``.

DeepSpeed's pipeline engine refuses ZeRO-2 and ZeRO-3 (``runtime/pipe/engine.py``). Here each
rank wraps its stage (``pipeline.StageModule``: the same layers and names as the
``PipelineModule`` stage) in a plain ``DeepSpeedEngine`` whose ZeRO partitions over the stage's
data-parallel group, and torch's ``Schedule1F1B`` runs the micro-batches (torchtitan's pattern,
with a DeepSpeed engine where torchtitan has FSDP2)::

    stage 0 (dp ranks 0,1)          stage 1 (dp ranks 2,3)
    F0 F1 B0 F2 B1 F3 B2 B3         F0 B0 F1 B1 F2 B2 F3 B3     (1F1B, M = 4)
    -> tied wte gradient summed over {stage 0, stage 1} -> engine.step() on every rank

What makes it exact (each measured against a one-rank run, tests/training/test_stages.py):

* every backward starts with ``deepspeed_compat.start_stage_backward``: ZeRO resets its
  per-backward state only in ``forward()``, and a backward that follows a backward (1F1B's
  cool-down) was otherwise never reduced;
* each engine divides the gradient entering its outputs by its accumulation steps M; the last
  stage's loss needs that once, so every earlier stage multiplies its incoming gradient by M
  (the double division of DeepSpeed #8152);
* ``managed_gradient_accumulation: false``: the schedule owns the micro-batches and
  ``step()`` runs once per global step;
* the token embedding lives on the first and the last stage: before the step both copies'
  gradients are summed over megatron-core's embedding group (DeepSpeed's public
  ``safe_get/set_local_grad`` under ZeRO-3, ``safe_get/set_full_grad`` under ZeRO-1/2), so the
  copies stay equal;
* the gradient norm is ZeRO's, all-reduced over TP x PP (``parallel.StageMPU``), the tied copy
  counted once (``deepspeed_compat.zero3_norm_by_tp_rank``).

The engine quacks like DeepSpeed's ``PipelineEngine`` where the training loop and the
objectives use it (``train_batch``, ``eval_batch``, ``micro_batches``); everything else
(``step``-free: ``save_checkpoint``, ``load_checkpoint``, ``get_global_grad_norm``, ``module``,
``optimizer``) is the stage's ``DeepSpeedEngine``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gpt_dist import deepspeed_compat
from gpt_dist.parallel import ParallelContext
from gpt_dist.pipeline import StageModule

TIED_WEIGHT = "tied_modules.embed.wte.weight"
"""The token embedding on the first stage and the output layer's copy on the last
(``pipeline.build_pipeline_module``: ``TiedLayerSpec("embed", ..., tied_weight_attr="wte.weight")``)."""


class _StageGrad(torch.autograd.Function):
    """Identity forward; in backward, first reset ZeRO's per-backward state, then scale the
    incoming gradient (M on every stage but the last; see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float, engine: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.scale, ctx.engine = scale, engine
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        deepspeed_compat.start_stage_backward(ctx.engine)
        return grad * ctx.scale if ctx.scale != 1 else grad, None, None


class _EngineStage(nn.Module):
    """What torch's ``PipelineStage`` runs: the stage's DeepSpeed engine, its output passed
    through ``_StageGrad``.

    ``recompute`` (``parallel.stage_recompute``, not on the last stage): the forward runs without
    a graph and is run again, with one, right before its backward (DeepSpeed's reentrant
    ``checkpointing.checkpoint``, which also restores the model-parallel RNG tracker, so the
    recomputed activation is the one sent on). A stage then never holds two micro-batches'
    graphs: ZeRO-3 releases each module's weights after its backward (with graphs pending it
    keeps the first stage's weights gathered through the cool-down: measured), at one more
    forward and one more all-gather of the stage's weights per micro-batch."""

    def __init__(self, engine: Any, scale: float, recompute: bool = False) -> None:
        super().__init__()
        object.__setattr__(self, "engine", engine)  # not a child: its parameters are the engine's
        self.scale, self.recompute = scale, recompute

    def _run(self, x: torch.Tensor, *_anchor: torch.Tensor, **labels: torch.Tensor) -> torch.Tensor:
        return _StageGrad.apply(self.engine(x, **labels), self.scale, self.engine)

    def forward(self, x: torch.Tensor, **labels: torch.Tensor) -> torch.Tensor:
        if not (self.recompute and torch.is_grad_enabled()):
            return self._run(x, **labels)
        import deepspeed  # the engine exists: DeepSpeed is imported already

        # reentrant checkpointing gives gradients only through inputs that require one: the
        # first stage's input is token ids, so an anchor that does
        anchor = torch.ones((), requires_grad=True)
        return deepspeed.checkpointing.checkpoint(self._run, x, anchor)


def _loss_is_output(output: torch.Tensor, target: Any) -> torch.Tensor:
    """The last ``StageModule`` returns its loss already (computed inside the engine)."""
    return output


class StagedPipelineEngine:
    """This rank's stage engine and the schedule that drives all stages (module docstring)."""

    def __init__(self, engine: Any, ctx: ParallelContext, micro_batches: int, zero_stage: int, *,
                 hidden: int, sequence_parallel: bool, dtype: torch.dtype, schedule: str = "1f1b",
                 recompute: bool = False) -> None:
        self.engine, self.ctx, self.micro_batches, self.zero_stage = engine, ctx, micro_batches, zero_stage
        self.hidden, self.sequence_parallel, self.dtype, self.schedule = hidden, sequence_parallel, dtype, schedule
        module: StageModule = engine.module
        self.is_first, self.is_last = ctx.is_first_stage, ctx.is_last_stage
        self._wrapped = _EngineStage(engine, 1.0 if self.is_last else float(micro_batches),
                                     recompute=recompute and not self.is_last)
        self._schedules: dict[tuple[Any, ...], Any] = {}
        # the tied weight only: the last stage's copy of the embedding module also holds wpe,
        # which it never uses (summing it would add a stale gradient every step: measured)
        self.tied = [p for n, p in module.named_parameters() if n == TIED_WEIGHT]
        if self.is_last:
            for p in self.tied:  # the copy: counted once in norms (the first stage owns it)
                p.ds_pipe_replicated = True
        if zero_stage < 3:  # ZeRO-1/2 hold the step's gradients where the public API reads them only inside step()
            deepspeed_compat.before_zero_step(engine, self.sum_tied_grads)
        self._new_trace = deepspeed_compat.zero3_trace_per_step(engine) if zero_stage == 3 else (lambda: None)

    def _schedule(self, tokens_shape: tuple[int, ...], train: bool) -> Any:
        """torch's schedule for micro-batches of ``tokens_shape`` ([b, s] token ids), built once
        per shape and mode, with the tensors' shapes given up front ("static" metadata).

        Left to infer them, torch's ``PipelineStage`` runs one extra forward and one
        ``autograd.grad`` through the stage at its first step: through a DeepSpeed engine that
        backward fires ZeRO's reduce hooks (ZeRO-2 fails, ZeRO-3 miscounts the next step:
        measured). The shapes are known: [s, b, h] between stages (s / tp under sequence
        parallelism), the loss (a scalar) out of the last."""
        key = (tuple(tokens_shape), train)
        if key in self._schedules:
            return self._schedules[key]
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        ctx, dev = self.ctx, self.ctx.device
        b, s = tokens_shape[0], tokens_shape[-1]
        act = torch.empty(s // ctx.tp if self.sequence_parallel else s, b, self.hidden, dtype=self.dtype, device=dev)
        # requires_grad on a received activation: torch sizes the gradient sent back by it
        inp = (torch.empty(*tokens_shape, dtype=torch.long, device=dev) if self.is_first
               else act.clone().requires_grad_(train))
        out = torch.empty((), dtype=torch.float32, device=dev) if self.is_last else act
        stage = PipelineStage(self._wrapped, ctx.pp_rank, ctx.pp, dev, group=ctx.pp_group,
                              input_args=(inp,), output_args=(out,),
                              input_grads=None if self.is_first else (act,),
                              output_grads=None if self.is_last else (act,))
        kind = Schedule1F1B if train and self.schedule == "1f1b" else ScheduleGPipe
        sched = kind(stage, n_microbatches=self.micro_batches, loss_fn=_loss_is_output, scale_grads=False)
        self._schedules[key] = sched
        return sched

    # -- what the loop and the objectives call ---------------------------------------------
    @property
    def module(self) -> StageModule:
        return self.engine.module

    def train_batch(self, data_iter: Iterable[tuple[Any, Any]]) -> torch.Tensor:
        """One optimizer step over ``micro_batches`` (inputs, labels) items; the mean loss
        over micro-batches and data-parallel ranks, on every rank."""
        losses: list[torch.Tensor] = []
        items = list(data_iter)
        args, kwargs = self._inputs(items)
        sched = self._schedule(tuple(items[0][0].shape), train=True)
        self._new_trace()
        sched.step(*args, target=kwargs.get("label_00"), losses=losses, return_outputs=False, **kwargs)
        if self.zero_stage == 3:
            self.sum_tied_grads()
        self.engine.step()
        return self._mean_loss(losses)

    def eval_batch(self, data_iter: Iterable[tuple[Any, Any]], compute_loss: bool = True) -> torch.Tensor:
        """Forward only over ``micro_batches`` items (the loss function runs on the last stage:
        fine-tuning's ``TaskLoss`` records there); the mean loss, on every rank."""
        losses: list[torch.Tensor] = []
        items = list(data_iter)
        args, kwargs = self._inputs(items)
        sched = self._schedule(tuple(items[0][0].shape), train=False)
        self._new_trace()
        with torch.no_grad():
            sched.eval(*args, target=kwargs.get("label_00"), losses=losses, return_outputs=False, **kwargs)
        return self._mean_loss(losses)

    def sum_tied_grads(self) -> None:
        """Sum the tied embedding's gradient over its first- and last-stage copies."""
        if not self.tied or self.ctx.pp == 1:
            return
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad, safe_set_full_grad, safe_set_local_grad

        get, put = ((safe_get_local_grad, safe_set_local_grad) if self.zero_stage == 3
                    else (safe_get_full_grad, safe_set_full_grad))
        for p in self.tied:
            g = get(p).clone()
            dist.all_reduce(g, group=self.ctx.embedding_group)
            put(p, g)

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def __getattr__(self, name: str) -> Any:  # everything else is the stage's engine
        return getattr(self.engine, name)

    # -- helpers ---------------------------------------------------------------------------
    def _inputs(self, items: list[tuple[Any, Any]]) -> tuple[tuple[Any, ...], dict[str, torch.Tensor]]:
        """Whole-batch tensors for torch's schedule, which splits them back into the same
        micro-batches along dim 0: the tokens on the first stage, the labels (keyword
        arguments ``label_00``, ...) on the last."""
        if len(items) != self.micro_batches:
            raise ValueError(f"pipeline step needs {self.micro_batches} micro-batches, got {len(items)}")
        args: tuple[Any, ...] = ()
        kwargs: dict[str, torch.Tensor] = {}
        if self.is_first:
            args = (torch.cat([it[0] for it in items]),)
        if self.is_last:
            labels = [it[1] if isinstance(it[1], tuple) else (it[1],) for it in items]
            kwargs = {f"label_{i:02d}": torch.cat([lab[i] for lab in labels]) for i in range(len(labels[0]))}
        return args, kwargs

    def _mean_loss(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """Mean over micro-batches (last stage) and data-parallel ranks, broadcast to every
        stage: what DeepSpeed's pipeline engine returns."""
        ctx = self.ctx
        out = torch.zeros((), dtype=torch.float32, device=ctx.device)
        if self.is_last:
            out = torch.stack([x.detach().float() for x in losses]).mean()
            if ctx.dp > 1:
                dist.all_reduce(out, group=ctx.dp_group)
                out = out / ctx.dp
        dist.broadcast(out, src=ctx.last_stage_rank, group=ctx.pp_group)
        return out
