"""tests/model: the model's layout, built in the test process (no DeepSpeed engine).

* ``meta_model(cfg)`` (a fixture) builds a TP=1 model on the meta device (no memory, no process group):
  the parameter counts of the full-size configs in a fraction of a second.
* ``ctx``: a world-size-1 gloo context (megatron-core's groups exist, so the tensor-parallel
  layers run forward), as tests/export does; os.environ is left as it was found.
"""

from __future__ import annotations

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
    from gpt_dist import rng

    with helpers.solo_context() as c:
        rng.seed_all(0)
        yield c
