"""tests/kernels: the Triton kernels against the PyTorch reference, forward and backward.

Without a GPU they run in Triton's interpreter on CPU tensors: ``TRITON_INTERPRET=1`` must be
set before Triton is first imported, so it is set here, at collection, and only when no CUDA
device exists (on a GPU machine, e.g. bench/gpu_check.sh, the same tests run the compiled
kernels on CUDA tensors). Sizes are tiny and awkward on purpose: not multiples of any block,
a single row, a vocabulary that is not a power of two.

Relative error is ``max|a - b| / max|b|`` (the float32 bar is 1e-5): elementwise relative
error is meaningless where the reference itself cancels (GELU near its zero, tiny gradients).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests import helpers

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if CUDA else "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def gen(seed: int | None = None) -> torch.Generator:
    """Fresh random inputs on every run (the properties hold for any input); the seed is
    printed, so pytest shows it with a failure and the case can be replayed."""
    seed = seed if seed is not None else int(torch.randint(0, 2**31, (1,)).item()) ^ os.getpid()
    print(f"inputs seed {seed}")
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, g: torch.Generator, scale: float = 1.0, dtype: torch.dtype = torch.float32,
          requires_grad: bool = False) -> torch.Tensor:
    t = (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)
    return t.requires_grad_(requires_grad)


@pytest.fixture(scope="session")
def ctx():
    """A world-size-1 gloo context (megatron-core's groups exist: its TP layers and CE run),
    as tests/model's; os.environ is left as it was found."""
    from gpt_dist import rng

    with helpers.solo_context(DEVICE) as c:
        rng.seed_all(0)
        yield c
