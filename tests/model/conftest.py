"""tests/model: the model's layout, built in the test process (no DeepSpeed engine).

* ``meta_model(cfg)`` (a fixture) builds a TP=1 model on the meta device (no memory, no process group):
  the parameter counts of the full-size configs in a fraction of a second.
* ``ctx``: a world-size-1 gloo context (megatron-core's groups exist, so the tensor-parallel
  layers run forward), as tests/export does; os.environ is left as it was found.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests import helpers


@pytest.fixture
def meta_model():
    """``meta_model(model_cfg)`` -> a TP=1 GPT on the meta device."""
    from gpt_dist.model.build import build_gpt as build_model

    def build(mcfg):
        with helpers.tp1_without_groups(), torch.device("meta"):
            return build_model(mcfg)

    return build


@pytest.fixture(scope="session")
def ctx():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import deepspeed

    from gpt_dist import rng
    from gpt_dist.config import ParallelConfig
    from gpt_dist.parallel import ParallelContext

    # DeepSpeed's TorchBackend would JIT-build (or rebuild, when another checkout with other
    # include paths built it last) its shared-memory inference all-reduce op: a minute of
    # compiling on 2 cores, for an op nothing here uses; gloo does the collectives
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    saved = dict(os.environ)
    try:
        c = ParallelContext.from_env(ParallelConfig(), device="cpu")
    finally:  # RANK/WORLD_SIZE/MASTER_PORT must not leak into later subprocess launches
        os.environ.clear()
        os.environ.update(saved)
    rng.seed_all(0)
    return c
