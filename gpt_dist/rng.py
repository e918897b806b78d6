"""Seeding and RNG state that works on CPU and GPU alike, and survives a checkpoint.

megatron-core's ``model_parallel_cuda_manual_seed`` asserts on a machine without CUDA, so
dropout under tensor parallelism uses DeepSpeed's ``CudaRNGStatesTracker`` instead: despite
its name it is device-agnostic (it swaps ``get_accelerator()``'s default generator, which is
torch's CPU generator on the CPU accelerator), and DeepSpeed's activation checkpointing
restores the same tracker on recomputation, so dropout is identical in the forward and the
recompute.

Regions (Megatron's convention):

* default generator: ``seed + 100 * pp_rank`` - identical across TP ranks, so dropout on
  replicated activations (embeddings, residual stream) uses the same mask on every TP rank;
* ``model-parallel-rng`` region: ``seed + 2718 + tp_rank`` - different per TP rank, for
  dropout on split activations (attention probabilities of the local heads; the residual
  stream when sequence parallelism splits it along the sequence).

DeepSpeed does not save RNG state in checkpoints (RELIABILITY.md finding 4), so
``rng_state_dict`` captures every generator as tensors and ints only, loadable with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import random
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"


def tracker() -> Any:
    from deepspeed.runtime.activation_checkpointing.checkpointing import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


def seed_all(seed: int, *, tp_rank: int = 0, pp_rank: int = 0) -> None:
    """Seed python, numpy, torch (and CUDA) and the TP dropout region for this rank."""
    base = seed + 100 * pp_rank
    random.seed(base)
    np.random.seed(base % (2**32))
    torch.manual_seed(base)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(base)
    trk = tracker()
    trk.reset()
    trk.add(MODEL_PARALLEL_RNG, seed + 2718 + tp_rank)


@contextlib.contextmanager
def tp_region() -> Iterator[None]:
    """Run the body under the per-TP-rank generator (dropout on split activations)."""
    with tracker().fork(MODEL_PARALLEL_RNG):
        yield


def param_generator(seed: int, name: str) -> torch.Generator:
    """A generator for one parameter's init, from (seed, parameter name) only.

    Initialisation then does not depend on the parallel layout or on construction order:
    TP=2, PP=2 and TP=1 models built from one seed hold the same full weights, which is what
    makes the sharded-vs-unsharded tests exact and a change of layout a no-op.
    """
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


def rng_state_dict() -> dict[str, Any]:
    """Every generator's state as tensors and ints (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def load_rng_state_dict(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["mt"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    trk = tracker()
    trk.set_states({k: v.clone() for k, v in state["tracker"].items()})
