"""LayerNorm and bias + GELU: Triton forward and backward vs PyTorch, float32, awkward sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.conftest import gen, randn, rel_err

TOL = 1e-5
SHAPES = [(1, 7), (5, 33), (3, 4, 130), (2, 3, 1000)]  # one row; not multiples of any block


@pytest.mark.parametrize("shape", SHAPES)
def test_layernorm_forward_backward(shape):
    from gpt_dist.kernels.layernorm import layer_norm

    g = gen()
    n = shape[-1]
    x = randn(*shape, g=g, scale=3.0, requires_grad=True)
    x.data += 2.0  # a non-zero mean
    w = randn(n, g=g, requires_grad=True)
    b = randn(n, g=g, requires_grad=True)
    dy = randn(*shape, g=g)
    y = layer_norm(x, w, b, 1e-5)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    ref = F.layer_norm(x, (n,), w, b, 1e-5)
    rx, rw, rb = torch.autograd.grad(ref, (x, w, b), dy)
    assert y.dtype == x.dtype and y.shape == x.shape
    for name, a, r in (("y", y, ref), ("dx", gx, rx), ("dw", gw, rw), ("db", gb, rb)):
        assert rel_err(a, r) < TOL, (name, rel_err(a, r))


@pytest.mark.parametrize("shape,bias", [((1, 5), True), ((3, 7, 129), True), ((2, 1100), False)])
def test_bias_gelu_forward_backward(shape, bias):
    from gpt_dist.kernels.bias_gelu import bias_gelu

    g = gen()
    x = randn(*shape, g=g, scale=3.0, requires_grad=True)  # covers both tails of GELU
    b = randn(shape[-1], g=g, requires_grad=True) if bias else None
    dy = randn(*shape, g=g)
    inputs = (x, b) if bias else (x,)
    y = bias_gelu(x, b)
    got = torch.autograd.grad(y, inputs, dy)
    ref = F.gelu(x + b if bias else x, approximate="tanh")
    want = torch.autograd.grad(ref, inputs, dy)
    assert rel_err(y, ref) < TOL
    for a, r in zip(got, want, strict=True):
        assert rel_err(a, r) < TOL


def test_bfloat16_kernels_round_like_the_reference():
    """Half precision: loads widen to float32 and the store rounds once (bf16 resolution)."""
    from gpt_dist.kernels.bias_gelu import bias_gelu
    from gpt_dist.kernels.layernorm import layer_norm

    g = gen()
    x = randn(6, 200, g=g, dtype=torch.bfloat16)
    w, b = randn(200, g=g, dtype=torch.bfloat16), randn(200, g=g, dtype=torch.bfloat16)
    ln = layer_norm(x, w, b, 1e-5)
    assert ln.dtype == torch.bfloat16
    assert rel_err(ln, F.layer_norm(x.float(), (200,), w.float(), b.float(), 1e-5)) < 1e-2
    gl = bias_gelu(x, b)
    assert rel_err(gl, F.gelu(x.float() + b.float(), approximate="tanh")) < 1e-2
