"""Shared pieces of the export tests: a single-process parallel context and random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ctx():
    """World size 1, TP=1 on CPU (megatron-core's groups exist, so our layers work)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from gpt_dist.config import ParallelConfig
    from gpt_dist.parallel import ParallelContext

    from gpt_dist import rng

    c = ParallelContext.from_env(ParallelConfig(), device="cpu")
    rng.seed_all(0)
    return c


def small_cfg(arch: str = "gpt2", **kw):
    from gpt_dist.config import ModelConfig

    base = dict(arch=arch, n_layer=2, n_head=4, n_embd=32, n_ctx=32, vocab_size=300,
                dropout=0.0, attn_dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def random_model(cfg, seed: int = 0):
    """A TP=1 GPT whose every parameter (LN gains and biases too) is random, in eval mode."""
    from gpt_dist.model.gpt import build_model

    model = build_model(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def native_state(model, cfg):
    """The model's full native state (real vocabulary rows only)."""
    from gpt_dist.export import canonical_name

    out = {}
    for name, p in model.named_parameters():
        canon = canonical_name(name, cfg.n_layer)
        if canon is not None:
            out[canon] = p.detach().clone()
    out["wte.weight"] = out["wte.weight"][: cfg.vocab_size].clone()
    return out
