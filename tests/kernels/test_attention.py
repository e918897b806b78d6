"""kernels.flash_attention: the flash SDPA operator is the one that runs (not math), equal
to the unrestricted call; a refusal is an error naming the switch, never a silent fall-back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from tests.kernels.conftest import CUDA, DEVICE, gen, randn, rel_err

DTYPE = torch.bfloat16 if CUDA else torch.float32  # CUDA's flash kernels are 16-bit only


def _ops(fn) -> set[str]:
    with profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_flash_backend_runs_and_matches_sdpa():
    from gpt_dist.kernels.attention import flash_attention

    g = gen()
    q, k, v = (randn(2, 3, 37, 16, g=g, dtype=DTYPE, requires_grad=True) for _ in range(3))
    out = flash_attention(q, k, v, 0.0)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel_err(out, ref) < (1e-5 if DTYPE == torch.float32 else 1e-2)
    ops = _ops(lambda: flash_attention(q, k, v, 0.0))
    flash = {o for o in ops if "flash_attention" in o}
    assert flash, sorted(ops)
    assert not {o for o in ops if "math" in o}, sorted(ops)
    dy = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), dy), torch.autograd.grad(ref, (q, k, v), dy), strict=True):
        assert rel_err(a, r) < (1e-5 if DTYPE == torch.float32 else 2e-2)


def test_refusal_is_an_error_naming_the_switch():
    from gpt_dist.kernels.attention import flash_attention

    g = gen()
    q = randn(1, 2, 8, 16, g=g)  # float32
    p = 0.0 if CUDA else 0.1     # CUDA: no float32 flash kernel; CPU: its flash kernel has no dropout
    with pytest.raises(RuntimeError, match="kernels.flash_attention"):
        flash_attention(q, q, q, p)


@pytest.mark.skipif(not CUDA, reason="flash dropout exists on CUDA only")
def test_flash_dropout_follows_the_generator_state():
    from gpt_dist.kernels.attention import flash_attention

    g = gen()
    q = randn(2, 2, 64, 32, g=g, dtype=DTYPE)
    state = torch.cuda.get_rng_state()
    a = flash_attention(q, q, q, 0.5)
    torch.cuda.set_rng_state(state)
    b = flash_attention(q, q, q, 0.5)
    assert torch.equal(a, b) and DEVICE == "cuda"
