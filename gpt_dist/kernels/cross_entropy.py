"""Vocabulary-parallel softmax cross-entropy that never holds float32 logits of the whole vocabulary.

Each TP rank holds logits for its slice [start, start + V/tp) of the (padded) vocabulary.
Per token, as megatron-core's ``vocab_parallel_cross_entropy`` does, but streamed:

    Triton pass 1 (per row, over the local vocabulary in blocks, online softmax):
        m_r = max_j l_j,  S_r = sum_j exp(l_j - m_r),  t_r = l_target (0 if not on this rank)
    TP all-reduce: M = max over ranks of m_r;  [S, T] = sum over ranks of [S_r exp(m_r - M), t_r]
    loss = M + log S - T                                        (lse - target logit)
    Triton pass 2 (backward): dl_j = (exp(l_j - lse) - [j == target]) * dloss, in l's dtype

Columns past the real vocabulary (TP padding) count as -inf. Megatron-core's own CE (and its
``fusions.fused_cross_entropy``) first copies the logits to float32 and keeps the float32
softmax for the backward: 4 bytes per token per vocabulary entry. Here the only float32
tensors are three numbers per token.

``fused_linear_cross_entropy`` goes further and takes the hidden states and the tied
embedding shard instead of logits: it computes ``chunk`` tokens' logits at a time
(``x_c @ wte^T``), their loss, and, since the loss is a scalar, its gradients w.r.t. x_c and
wte right away (pass 2 overwrites the chunk's logits with dlogits; then two GEMMs). The
backward only scales the stored gradients by the incoming scalar. Peak memory for the
output layer is one chunk of logits plus dx and a float32 dwte, instead of the whole
[tokens, V/tp] logits and their float32 softmax; no GEMM is recomputed.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from gpt_dist.kernels._common import next_pow2
from gpt_dist.parallel import TPGroup


@triton.jit
def _ce_stats(L, stride, T, MAX, SE, TGT, n_valid, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = L + row * stride
    m = tl.full((), -1e30, tl.float32)
    s = tl.full((), 0.0, tl.float32)
    for start in range(0, n_valid, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        lv = tl.load(base + cols, mask=cols < n_valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(lv, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(lv - m_new), axis=0)
        m = m_new
    t = tl.load(T + row)
    ok = (t >= 0) & (t < n_valid)
    tv = tl.load(base + tl.where(ok, t, 0), mask=ok, other=0.0).to(tl.float32)
    tl.store(MAX + row, m)
    tl.store(SE + row, s)
    tl.store(TGT + row, tv)


@triton.jit
def _ce_grad(L, stride, G, g_stride, T, LSE, SCALE, V, n_valid, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = L + row * stride
    out = G + row * g_stride
    lse = tl.load(LSE + row)
    g = tl.load(SCALE + row)
    t = tl.load(T + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        lv = tl.load(base + cols, mask=cols < n_valid, other=float("-inf")).to(tl.float32)
        d = tl.exp(lv - lse) * g
        d = tl.where(cols == t, d - g, d)
        tl.store(out + cols, d.to(G.dtype.element_ty), mask=cols < V)


def _block(v: int, t: torch.Tensor, block_v: int | None) -> int:
    return block_v or (min(4096, next_pow2(v)) if t.is_cuda else min(16384, next_pow2(v)))


def _lse_and_target(logits2d: torch.Tensor, tgt_local: torch.Tensor, n_valid: int, group: Any,
                    block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 and the TP reductions: (log-sum-exp, target logit) per row, float32."""
    rows = logits2d.shape[0]
    m = torch.empty(rows, dtype=torch.float32, device=logits2d.device)
    se, tv = torch.empty_like(m), torch.empty_like(m)
    if rows:
        _ce_stats[(rows,)](logits2d, logits2d.stride(0), tgt_local, m, se, tv, n_valid, BLOCK_V=block)
    if group is not None:
        import torch.distributed as dist

        big = m.clone()
        dist.all_reduce(big, op=dist.ReduceOp.MAX, group=group)
        st = torch.stack([se * torch.exp(m - big), tv])
        dist.all_reduce(st, op=dist.ReduceOp.SUM, group=group)
        return big + torch.log(st[0]), st[1]
    return m + torch.log(se), tv


def _dlogits(logits2d: torch.Tensor, out2d: torch.Tensor, tgt_local: torch.Tensor, lse: torch.Tensor,
             scale: torch.Tensor, n_valid: int, block: int) -> None:
    """Pass 2: out = (softmax - onehot) * scale (per row); ``out`` may be ``logits2d``."""
    rows, v = logits2d.shape
    if rows:
        _ce_grad[(rows,)](logits2d, logits2d.stride(0), out2d, out2d.stride(0), tgt_local, lse, scale, v,
                          n_valid, BLOCK_V=block)


def _local(vocab: int | None, v_local: int, tp: TPGroup | None) -> tuple[Any, int, int]:
    """(TP group or None, this rank's first vocabulary id, how many of its columns are real ids)."""
    tp = tp or TPGroup()
    group, world, rank = (tp.group if tp.size > 1 else None), tp.size, tp.rank
    start = rank * v_local
    real = v_local * world if vocab is None else vocab
    return group, start, max(0, min(v_local, real - start))


class VocabParallelCrossEntropy(torch.autograd.Function):
    """logits [..., V/tp] (any float dtype), target [...] (global ids) -> loss [...] float32."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, vocab: int | None,  # type: ignore[override]
                block_v: int | None, tp: TPGroup | None) -> torch.Tensor:
        v_local = logits.shape[-1]
        group, start, n_valid = _local(vocab, v_local, tp)
        l2 = logits.reshape(-1, v_local)
        if l2.stride(-1) != 1:
            l2 = l2.contiguous()
        tgt = (target.reshape(-1).long() - start).contiguous()
        block = _block(v_local, l2, block_v)
        lse, tv = _lse_and_target(l2, tgt, n_valid, group, block)
        ctx.save_for_backward(l2, tgt, lse)
        ctx.shape, ctx.n_valid, ctx.block = logits.shape, n_valid, block
        return (lse - tv).view(target.shape)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        l2, tgt, lse = ctx.saved_tensors
        grad = torch.empty(l2.shape, dtype=l2.dtype, device=l2.device)
        _dlogits(l2, grad, tgt, lse, g.reshape(-1).float().contiguous(), ctx.n_valid, ctx.block)
        return grad.view(ctx.shape), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab: int | None = None,
                                 block_v: int | None = None, tp: TPGroup | None = None) -> torch.Tensor:
    """megatron-core's ``tensor_parallel.vocab_parallel_cross_entropy(logits.float(), target)``
    without the float32 copy; ``vocab`` (the real vocabulary) masks the TP padding columns;
    ``tp``: the TP group the vocabulary is split over (None: not split)."""
    return VocabParallelCrossEntropy.apply(logits, target, vocab, block_v, tp)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(x_i @ wte^T, target_i) over the TP-split vocabulary, ``chunk`` rows at a time.

    x [N, h] is this rank's full (TP-replicated) input; the gradient returned for it is this
    rank's vocabulary slice's share, summed over TP by the caller's region (megatron's
    ``copy_to_tensor_model_parallel_region``, or the sequence-parallel gather)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,  # type: ignore[override]
                tok_weight: torch.Tensor, vocab: int, chunk: int, need_grad: bool,
                block_v: int | None, tp: TPGroup | None) -> torch.Tensor:
        n_rows, v_local = x.shape[0], weight.shape[0]
        group, start, n_valid = _local(vocab, v_local, tp)
        tgt = (target.reshape(-1).long() - start).contiguous()
        w = tok_weight.reshape(-1).float().contiguous()
        block = _block(v_local, x, block_v)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        gx = torch.empty_like(x) if need_grad else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_grad else None
        for r0 in range(0, n_rows, chunk):
            r1 = min(n_rows, r0 + chunk)
            xc = x[r0:r1]
            logits = xc @ weight.t()                                   # [C, V/tp], x's dtype
            lse, tv = _lse_and_target(logits, tgt[r0:r1], n_valid, group, block)
            total += ((lse - tv) * w[r0:r1]).sum()
            if need_grad:
                _dlogits(logits, logits, tgt[r0:r1], lse, w[r0:r1], n_valid, block)  # in place
                torch.mm(logits, weight, out=gx[r0:r1])               # type: ignore[index]
                if gw.dtype == logits.dtype:                           # type: ignore[union-attr]
                    gw.addmm_(logits.t(), xc)                          # type: ignore[union-attr]
                else:
                    gw.add_(logits.t() @ xc)                           # type: ignore[union-attr]
            del logits
        ctx.save_for_backward(gx, gw)
        ctx.w_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        gx, gw = ctx.saved_tensors
        if gx is None:
            raise RuntimeError("fused_linear_cross_entropy: backward through a forward run without need_grad")
        return gx * g.to(gx.dtype), (gw * g).to(ctx.w_dtype), None, None, None, None, None, None, None


def fused_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               tok_weight: torch.Tensor, vocab: int, chunk: int = 2048,
                               block_v: int | None = None, tp: TPGroup | None = None) -> torch.Tensor:
    """Scalar ``sum_i tok_weight_i * CE_i`` of the tied output layer; x [N, h], weight
    [V/tp, h], target and tok_weight [N]. Gradients are computed in the forward only when
    autograd will need them."""
    need = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return FusedLinearCrossEntropy.apply(x, weight, target, tok_weight, vocab, chunk, need, block_v, tp)
