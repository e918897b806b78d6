"""The streamed vocabulary-parallel CE and the CE fused with the tied output layer, TP=1,
against megatron-core's ``vocab_parallel_cross_entropy`` on float32 logits (the reference
path of ``gpt_dist.model.gpt.lm_loss``). TP=2 is test_tp2.py."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import DEVICE, gen, randn, rel_err

TOL = 1e-5


def _megatron_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from megatron.core import tensor_parallel

    return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), target)


def _masked(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """The reference masks TP padding columns to the dtype's minimum (mask_padded_vocab)."""
    cols = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill(cols >= vocab, torch.finfo(logits.dtype).min)


@pytest.mark.parametrize("rows,v_local,vocab,block", [(1, 389, 389, 128), (7, 389, 301, 64), (13, 1000, 1000, None)])
def test_streamed_ce_matches_megatron(ctx, rows, v_local, vocab, block):
    from gpt_dist.kernels.cross_entropy import vocab_parallel_cross_entropy

    g = gen()
    logits = randn(rows, 2, v_local, g=g, scale=4.0, requires_grad=True)
    target = torch.randint(0, vocab, (rows, 2), generator=g).to(DEVICE)
    dy = randn(rows, 2, g=g)
    loss = vocab_parallel_cross_entropy(logits, target, vocab, block_v=block)
    (got,) = torch.autograd.grad(loss, logits, dy)
    ref = _megatron_ce(_masked(logits, vocab), target)
    (want,) = torch.autograd.grad(ref, logits, dy)
    assert loss.dtype == torch.float32 and loss.shape == target.shape
    assert rel_err(loss, ref) < TOL
    assert rel_err(got, want) < TOL
    if vocab < v_local:
        assert got[..., vocab:].abs().max().item() == 0  # padding columns: no gradient


@pytest.mark.parametrize("n,chunk,masked", [(1, 4, False), (23, 5, True), (23, 2048, False)])
def test_fused_linear_ce_matches_logits_then_ce(ctx, n, chunk, masked):
    """sum_i w_i CE(x_i W^T): loss, dx and dW (the tied embedding's gradient), chunks that do
    not divide the tokens, padded vocabulary rows."""
    from gpt_dist.kernels.cross_entropy import fused_linear_cross_entropy

    g = gen()
    h, v_local, vocab = 24, 391, 300
    x = randn(n, h, g=g, requires_grad=True)
    w = randn(v_local, h, g=g, scale=0.5, requires_grad=True)
    target = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    m = (torch.rand(n, generator=g) > 0.4).float().to(DEVICE) if masked else torch.ones(n, device=DEVICE)
    tok_w = m / m.sum().clamp(min=1.0)
    loss = fused_linear_cross_entropy(x, w, target, tok_w, vocab, chunk=chunk, block_v=128)
    gx, gw = torch.autograd.grad(loss * 1.7, (x, w))  # a non-unit upstream gradient
    ref = (_megatron_ce(_masked(x @ w.t(), vocab), target) * tok_w).sum()
    rx, rw = torch.autograd.grad(ref * 1.7, (x, w))
    assert loss.shape == () and rel_err(loss, ref) < TOL
    assert rel_err(gx, rx) < TOL and rel_err(gw, rw) < TOL
    assert gw[vocab:].abs().max().item() == 0  # padding rows of the embedding get no gradient


def test_fused_linear_ce_without_grad_computes_only_the_loss(ctx):
    from gpt_dist.kernels.cross_entropy import fused_linear_cross_entropy

    g = gen()
    x, w = randn(9, 8, g=g, requires_grad=True), randn(130, 8, g=g, requires_grad=True)
    target = torch.randint(0, 130, (9,), generator=g).to(DEVICE)
    tok_w = torch.full((9,), 1 / 9, device=DEVICE)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(x, w, target, tok_w, 130, chunk=4)
    with_grad = fused_linear_cross_entropy(x, w, target, tok_w, 130, chunk=4)
    assert not loss.requires_grad and with_grad.requires_grad
    assert rel_err(loss, with_grad) < 1e-6
