"""``residual + dropout(x + bias)`` in one Triton kernel, forward and backward.

The mask must come from the same RNG region as the unfused path (``gpt_dist.rng``): the
default generator for activations replicated over TP ranks, ``tp_region()`` for split ones
(sequence parallelism), so TP dropout stays right and a checkpoint (which saves every
generator) resumes it exactly. Two ways to get it, chosen per call (``rng``):

* ``"mask"`` (the default on CPU): the mask is ``torch.empty_like(x).bernoulli_(1 - p)`` drawn
  in the caller's region: exactly the draw ``F.dropout`` makes on a CPU, so on CPU the fused
  path reproduces the unfused one mask for mask;
* ``"philox"`` (the default on CUDA): one int64 seed is drawn from the region's generator
  (``torch.randint``), and the kernel derives every element's keep bit from (seed, element
  index) with Triton's Philox; the backward re-derives it, so no mask is stored. PyTorch's
  CUDA dropout uses its own fused Philox stream, so no CUDA path could replay its masks
  anyway; what matters (same generator, same region, restored by checkpoints and by
  activation recomputation) holds.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import triton
import triton.language as tl

from gpt_dist.kernels._common import elementwise_block

_NONE, _MASK, _PHILOX = 0, 1, 2


@triton.jit
def _bda_fwd(X, B, R, Mask, Seed, Y, numel, N, p, scale, HAS_BIAS: tl.constexpr, MODE: tl.constexpr,
             BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    x = tl.load(X + offs, mask=inb, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(B + offs % N, mask=inb, other=0.0).to(tl.float32)
    if MODE == 1:
        keep = tl.load(Mask + offs, mask=inb, other=0) != 0
        x = tl.where(keep, x * scale, 0.0)
    elif MODE == 2:
        seed = tl.load(Seed)
        keep = tl.rand(seed, offs) >= p
        x = tl.where(keep, x * scale, 0.0)
    r = tl.load(R + offs, mask=inb, other=0.0).to(tl.float32)
    tl.store(Y + offs, (r + x).to(Y.dtype.element_ty), mask=inb)


@triton.jit
def _bda_bwd(G, Mask, Seed, DX, numel, p, scale, MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    g = tl.load(G + offs, mask=inb, other=0.0).to(tl.float32)
    if MODE == 1:
        keep = tl.load(Mask + offs, mask=inb, other=0) != 0
        g = tl.where(keep, g * scale, 0.0)
    elif MODE == 2:
        seed = tl.load(Seed)
        keep = tl.rand(seed, offs) >= p
        g = tl.where(keep, g * scale, 0.0)
    tl.store(DX + offs, g.to(DX.dtype.element_ty), mask=inb)


class BiasDropoutAddFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,  # type: ignore[override]
                mask: torch.Tensor | None, seed: torch.Tensor | None, p: float) -> torch.Tensor:
        x, residual = x.contiguous(), residual.contiguous()
        mode = _MASK if mask is not None else _PHILOX if seed is not None else _NONE
        scale = 1.0 / (1.0 - p) if mode else 1.0
        y = torch.empty_like(x)
        block = elementwise_block(x)
        if x.numel():
            _bda_fwd[(triton.cdiv(x.numel(), block),)](
                x, bias if bias is not None else x, residual, mask if mask is not None else x,
                seed if seed is not None else x, y, x.numel(), x.shape[-1], p, scale,
                HAS_BIAS=bias is not None, MODE=mode, BLOCK=block)
        ctx.save_for_backward(mask, seed)
        ctx.mode, ctx.p, ctx.scale, ctx.n = mode, p, scale, x.shape[-1]
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        mask, seed = ctx.saved_tensors
        g = g.contiguous()
        if ctx.mode == _NONE:
            dx = g
        else:
            dx = torch.empty_like(g)
            block = elementwise_block(g)
            if g.numel():
                _bda_bwd[(triton.cdiv(g.numel(), block),)](
                    g, mask if mask is not None else g, seed if seed is not None else g, dx, g.numel(),
                    ctx.p, ctx.scale, MODE=ctx.mode, BLOCK=block)
        db = None
        if ctx.has_bias and ctx.needs_input_grad[1]:
            db = dx.view(-1, ctx.n).sum(0, dtype=torch.float32).to(dx.dtype)
        return dx, db, g, None, None, None


def bias_dropout_add(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, p: float,
                     training: bool, region: contextlib.AbstractContextManager[Any] | None = None,
                     rng: str = "auto") -> torch.Tensor:
    """``residual + F.dropout(x + bias, p, training)``; the mask (or seed) is drawn inside
    ``region`` (``gpt_dist.rng.tp_region()`` for split activations, else the default
    generator). ``rng``: ``"mask"``, ``"philox"`` or ``"auto"`` (philox on CUDA)."""
    mask = seed = None
    if training and p > 0.0:
        if rng == "auto":
            rng = "philox" if x.is_cuda else "mask"
        with region if region is not None else contextlib.nullcontext():
            if rng == "mask":
                mask = torch.empty_like(x).bernoulli_(1.0 - p)  # F.dropout's own draw (CPU)
            elif rng == "philox":
                seed = torch.randint(0, 2**62, (1,), device=x.device, dtype=torch.int64)
            else:
                raise ValueError(f"bias_dropout_add: rng must be auto, mask or philox, got {rng!r}")
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return BiasDropoutAddFunction.apply(x, bias, residual.to(x.dtype), mask, seed, p)
