"""bias + dropout + residual: values, gradients, and where the mask's randomness comes from.

The reference is ``residual + F.dropout(x + bias)``. In "mask" mode (the CPU default) the
mask is F.dropout's own draw, so the fused result equals the reference bit for bit in the
same RNG state; in "philox" mode (the CUDA default) the kernel derives the mask from a seed
drawn from the same generator: the tests check it is that generator (region, restore) that
decides the mask, that p of the elements are dropped, and that backward uses forward's mask.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.conftest import CUDA, DEVICE, gen, randn, rel_err

SHAPE = (3, 5, 37)  # 555 elements: not a multiple of any block


def _inputs(bias: bool = True):
    g = gen()
    x = randn(*SHAPE, g=g, requires_grad=True)
    b = randn(SHAPE[-1], g=g, requires_grad=True) if bias else None
    r = randn(*SHAPE, g=g, requires_grad=True)
    return x, b, r, randn(*SHAPE, g=g)


def _grads(out, x, b, r, dy):
    return torch.autograd.grad(out, [t for t in (x, b, r) if t is not None], dy)


@pytest.mark.parametrize("bias", [True, False])
def test_without_dropout_equals_reference(bias):
    from gpt_dist.kernels.bias_dropout_add import bias_dropout_add

    x, b, r, dy = _inputs(bias)
    for training, p in ((False, 0.3), (True, 0.0)):
        out = bias_dropout_add(x, b, r, p, training)
        ref = r + F.dropout(x + b if bias else x, p, training)
        assert rel_err(out, ref) < 1e-6
        for a, w in zip(_grads(out, x, b, r, dy), _grads(ref, x, b, r, dy), strict=True):
            assert rel_err(a, w) < 1e-6


@pytest.mark.skipif(CUDA, reason="CUDA's F.dropout uses its own fused Philox stream; mask mode replays the CPU draw")
def test_mask_mode_is_f_dropout_draw_for_draw():
    from gpt_dist.kernels.bias_dropout_add import bias_dropout_add

    x, b, r, dy = _inputs()
    state = torch.get_rng_state()
    out = bias_dropout_add(x, b, r, 0.25, True, rng="mask")
    after_fused = torch.get_rng_state()
    torch.set_rng_state(state)
    ref = r + F.dropout(x + b, 0.25, True)
    assert torch.equal(torch.get_rng_state(), after_fused)  # the generator advanced the same
    assert torch.equal(out, ref)
    for a, w in zip(_grads(out, x, b, r, dy), _grads(ref, x, b, r, dy), strict=True):
        assert rel_err(a, w) < 1e-6


@pytest.mark.parametrize("mode", ["mask", "philox"])
def test_mask_statistics_and_backward_uses_forward_mask(mode):
    from gpt_dist.kernels.bias_dropout_add import bias_dropout_add

    g = gen()
    n, p = 40_001, 0.3
    x = (torch.rand(n, generator=g) + 0.5).to(DEVICE).requires_grad_(True)  # never 0: kept <=> out != r
    r = torch.zeros(n, device=DEVICE, requires_grad=True)
    out = bias_dropout_add(x, None, r, p, True, rng=mode)
    kept = out != 0
    frac = 1 - kept.float().mean().item()
    assert abs(frac - p) < 0.02, frac  # 40k Bernoulli(0.3): sd 0.0023
    assert rel_err(out[kept], x[kept] / (1 - p)) < 1e-6
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    torch.testing.assert_close(gx, kept.float() / (1 - p))  # the same elements, the same scale


@pytest.mark.parametrize("mode", ["mask", "philox"])
def test_mask_follows_the_generator_state_and_region(mode):
    """Restoring the generator (a checkpoint resume, activation recomputation) replays the
    mask; the TP region (gpt_dist.rng.tp_region) gives a different one and leaves the
    default generator untouched."""
    from gpt_dist import rng
    from gpt_dist.kernels.bias_dropout_add import bias_dropout_add

    rng.seed_all(7, tp_rank=0)
    x, b, r, _ = _inputs()
    saved = rng.rng_state_dict()
    first = bias_dropout_add(x, b, r, 0.5, True, rng=mode)
    second = bias_dropout_add(x, b, r, 0.5, True, rng=mode)
    assert not torch.equal(first, second)          # the generator moved on
    rng.load_rng_state_dict(saved)
    assert torch.equal(bias_dropout_add(x, b, r, 0.5, True, rng=mode), first)
    rng.load_rng_state_dict(saved)
    default_before = torch.get_rng_state() if not CUDA else torch.cuda.get_rng_state()
    split = bias_dropout_add(x, b, r, 0.5, True, rng.tp_region(), rng=mode)
    default_after = torch.get_rng_state() if not CUDA else torch.cuda.get_rng_state()
    assert torch.equal(default_before, default_after)  # drawn from the TP region's generator
    assert not torch.equal(split, first)
