"""GELU (tanh approximation) of ``x + bias``, forward and backward in one Triton kernel each.

The MLP's c_fc runs with ``skip_bias_add`` and hands its bias here, so the [s, b, 4h/tp]
activation is read once and written once forward (instead of bias-add, then GELU) and the
backward recomputes from the saved pre-bias input (as megatron-core's ``bias_gelu_impl``).

    gelu(z) = z/2 (1 + tanh(u)),  u = sqrt(2/pi) (z + 0.044715 z^3)
            = z * sigmoid(2u)                 (the form computed: no 1 + tanh cancellation)
    gelu'(z) = s + 2 z s (1 - s) du/dz,      s = sigmoid(2u), du/dz = sqrt(2/pi)(1 + 3*0.044715 z^2)

megatron-core 0.16's ``fused_bias_gelu`` is the same expression under ``torch.compile``; the
``kernels.compile`` option gets that fusion for the whole block.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from gpt_dist.kernels._common import elementwise_block

_K0 = 0.7978845608028654  # sqrt(2/pi)
_K1 = 0.044715


@triton.jit
def _gelu_fwd(X, B, Y, numel, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(B + offs % N, mask=mask, other=0.0).to(tl.float32)
    u = 0.7978845608028654 * z * (1.0 + 0.044715 * z * z)
    y = z / (1.0 + tl.exp(-2.0 * u))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd(X, B, G, DZ, numel, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(B + offs % N, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = 0.7978845608028654 * z * (1.0 + 0.044715 * z * z)
    s = 1.0 / (1.0 + tl.exp(-2.0 * u))
    du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
    d = s + 2.0 * z * s * (1.0 - s) * du
    tl.store(DZ + offs, (g * d).to(DZ.dtype.element_ty), mask=mask)


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        y = torch.empty_like(x)
        n = x.shape[-1]
        block = elementwise_block(x)
        if x.numel():
            _gelu_fwd[(triton.cdiv(x.numel(), block),)](x, bias if bias is not None else x, y, x.numel(), n,
                                                        HAS_BIAS=bias is not None, BLOCK=block)
        ctx.save_for_backward(x, bias)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:  # type: ignore[override]
        x, bias = ctx.saved_tensors
        g = g.contiguous()
        dz = torch.empty_like(x)
        block = elementwise_block(x)
        if x.numel():
            _gelu_bwd[(triton.cdiv(x.numel(), block),)](x, bias if bias is not None else x, g, dz, x.numel(),
                                                        x.shape[-1], HAS_BIAS=bias is not None, BLOCK=block)
        db = None
        if bias is not None and ctx.needs_input_grad[1]:
            db = dz.view(-1, x.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype)
        return dz, db


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.gelu(x + bias, approximate="tanh")`` (bias optional) with the Triton kernels."""
    return BiasGeluFunction.apply(x, bias)
