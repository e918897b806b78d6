"""Megatron sequence parallelism's regions on any device.

megatron-core's sequence mappings allocate on ``torch.cuda.current_device()``; these are the
same operations on any device (gloo on CPU, NCCL on GPU), along dim 0 = the sequence.
"""

from __future__ import annotations

from typing import Any

import torch


def _tp_group_size() -> tuple[Any, int, int]:
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_rank())


def _all_gather_seq(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    group, n, _ = _tp_group_size()
    x = x.contiguous()
    if x.is_cuda:
        out = torch.empty((n * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x, group=group)
        return out
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=0)


def _slice_seq(x: torch.Tensor) -> torch.Tensor:
    _, n, r = _tp_group_size()
    step = x.shape[0] // n
    return x[r * step:(r + 1) * step].contiguous()


def _reduce_scatter_seq(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    group, n, _ = _tp_group_size()
    x = x.contiguous()
    if x.is_cuda:
        out = torch.empty((x.shape[0] // n, *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, x, group=group)
        return out
    x = x.clone()
    dist.all_reduce(x, group=group)  # gloo has no reduce-scatter
    return _slice_seq(x)


class _SeqGather(torch.autograd.Function):
    """All-gather along the sequence. Backward: this rank's slice of the gradient, summed over
    TP first when every rank holds a partial gradient (``reduce_grad``, Megatron's
    ``tensor_parallel_output_grad``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, reduce_grad: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.reduce_grad = reduce_grad
        return _all_gather_seq(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return (_reduce_scatter_seq(g) if ctx.reduce_grad else _slice_seq(g)), None


class _SeqSplit(torch.autograd.Function):
    """Keep this rank's sequence slice of a TP-replicated tensor; backward all-gathers."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _slice_seq(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _all_gather_seq(g)


def seq_gather(x: torch.Tensor, reduce_grad: bool = True) -> torch.Tensor:
    """[s/tp, b, h] -> [s, b, h] over the TP group."""
    return _SeqGather.apply(x, reduce_grad)


def seq_split(x: torch.Tensor) -> torch.Tensor:
    """[s, b, h] (identical on the TP ranks) -> this rank's [s/tp, b, h]."""
    return _SeqSplit.apply(x)
