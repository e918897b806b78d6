"""Megatron sequence parallelism's regions on any device.

megatron-core's sequence mappings allocate on ``torch.cuda.current_device()``; these are the
same operations on any device (gloo on CPU, NCCL on GPU), along dim 0 = the sequence. They
are the project's one sequence-parallel implementation: the CPU tests run exactly the code a
GPU runs (``all_gather_into_tensor`` / ``reduce_scatter_tensor`` on CUDA tensors, their gloo
equivalents on CPU). The TP group comes in explicitly (``TPGroup``, from the context).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from gpt_dist.parallel import TPGroup


def _all_gather_seq(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    group, n = tp.group, tp.size
    if n == 1:
        return x
    x = x.contiguous()
    if x.is_cuda:
        out = torch.empty((n * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x, group=group)
        return out
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=0)


def _slice_seq(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    n, r = tp.size, tp.rank
    if n == 1:
        return x
    step = x.shape[0] // n
    return x[r * step:(r + 1) * step].contiguous()


def _reduce_scatter_seq(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    group, n = tp.group, tp.size
    if n == 1:
        return x
    x = x.contiguous()
    if x.is_cuda:
        out = torch.empty((x.shape[0] // n, *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, x, group=group)
        return out
    x = x.clone()
    dist.all_reduce(x, group=group)  # gloo has no reduce-scatter
    return _slice_seq(x, tp)


class _SeqGather(torch.autograd.Function):
    """All-gather along the sequence. Backward: this rank's slice of the gradient, summed over
    TP first when every rank holds a partial gradient (``reduce_grad``, Megatron's
    ``tensor_parallel_output_grad``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: TPGroup, reduce_grad: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.reduce_grad, ctx.tp = reduce_grad, tp
        return _all_gather_seq(x, tp)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return (_reduce_scatter_seq(g, ctx.tp) if ctx.reduce_grad else _slice_seq(g, ctx.tp)), None, None


class _SeqSplit(torch.autograd.Function):
    """Keep this rank's sequence slice of a TP-replicated tensor; backward all-gathers."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: TPGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.tp = tp
        return _slice_seq(x, tp)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _all_gather_seq(g, ctx.tp), None


def seq_gather(x: torch.Tensor, tp: TPGroup, reduce_grad: bool = True) -> torch.Tensor:
    """[s/tp, b, h] -> [s, b, h] over the TP group."""
    return _SeqGather.apply(x, tp, reduce_grad)


def seq_split(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """[s, b, h] (identical on the TP ranks) -> this rank's [s/tp, b, h]."""
    return _SeqSplit.apply(x, tp)
