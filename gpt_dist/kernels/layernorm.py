"""LayerNorm over the last dimension: one Triton program per row forward, row blocks backward.

Forward keeps the per-row mean and 1/std (float32) for the backward, as ``torch.nn.functional
.layer_norm`` does. Backward computes dx row by row and each program sums dw/db over its own
block of rows into a [programs, N] float32 buffer, summed by one torch reduction: no atomics,
so the result is deterministic (and the interpreter can run it).

megatron-core's ``FusedLayerNorm`` needs Apex (``fused_layer_norm_cuda``) or Transformer
Engine, and neither is a dependency here, so this one is ours.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from gpt_dist.kernels._common import next_pow2, row_programs


@triton.jit
def _ln_fwd(X, Y, W, B, Mean, Rstd, N, eps, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * w + b
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _ln_bwd(X, DY, DX, W, Mean, Rstd, DW, DB, M, N, rows_per_prog, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    for r in range(start, end):
        row = tl.cast(r, tl.int64)
        x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=0) / N
        c2 = tl.sum(wdy, axis=0) / N
        dx = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    tl.store(DW + pid * N + cols, dw, mask=mask)
    tl.store(DB + pid * N + cols, db, mask=mask)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,  # type: ignore[override]
                eps: float) -> torch.Tensor:
        n = x.shape[-1]
        x2 = x.contiguous().view(-1, n)
        m = x2.shape[0]
        y = torch.empty_like(x2)
        mean = torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        block = next_pow2(n)
        if m:
            _ln_fwd[(m,)](x2, y, weight, bias, mean, rstd, n, eps, BLOCK_N=block)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x2, weight, mean, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = dy.contiguous().view(-1, n)
        dx = torch.empty_like(x2)
        progs = row_programs(m, x2)
        rows_per_prog = -(-m // progs) if m else 1
        progs = -(-m // rows_per_prog) if m else 1
        dw = torch.zeros(progs, n, dtype=torch.float32, device=x2.device)
        db = torch.zeros(progs, n, dtype=torch.float32, device=x2.device)
        if m:
            _ln_bwd[(progs,)](x2, dy2, dx, weight, mean, rstd, dw, db, m, n, rows_per_prog,
                              BLOCK_N=next_pow2(n))
        return (dx.view(ctx.shape), dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype), None)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.layer_norm(x, (N,), weight, bias, eps)`` with the Triton kernels."""
    return LayerNormFunction.apply(x, weight, bias, eps)
