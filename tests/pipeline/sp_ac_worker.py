"""Two-rank (tp=2, gloo) forward+backward of the GPT module, no DeepSpeed engine.

Run by test_sequence_parallel_and_checkpointing.py (``python sp_ac_worker.py OUT``), which
starts the two ranks with tests/helpers.py ``run_ranks``; each rank writes what it measured
to ``OUT/rank{r}.json`` (a failing rank fails the launch with its rank and traceback).
Compared, per rank:

* sequence parallel vs none (dropout off): loss and every local gradient shard;
* activation checkpointing (every block, every 2nd block, partitioned over TP or not;
  with and without sequence parallelism) vs none, with dropout on: loss and gradients.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from tests import helpers

TOL = 1e-5


def _model_cfg(dropout: float):
    from gpt_dist.config import ModelConfig

    return ModelConfig(arch="gpt2", n_layer=4, n_head=4, n_embd=32, n_ctx=32, vocab_size=101,
                       dropout=dropout, attn_dropout=dropout)


def _run(ctx, mcfg, *, sp: bool, every: int = 0, partition: bool = False, seed: int = 7):
    """Build, seed, forward + backward one batch; returns (loss, {name: grad})."""
    from gpt_dist import rng
    from gpt_dist.config import ParallelConfig
    from gpt_dist.model.build import build_gpt as build_model
    from gpt_dist.training.engine import configure_activation_checkpointing

    model = build_model(mcfg, ctx.tensor_parallel, sequence_parallel=sp, seed=seed)
    model.train()
    if every:
        par = ParallelConfig(tp=2, sequence_parallel=sp, activation_checkpointing="full",
                             checkpoint_every=every, partition_activations=partition)
        configure_activation_checkpointing(par, ctx)
        model.checkpoint_every = every
    g = torch.Generator().manual_seed(123)                      # same data on both TP ranks
    ids = torch.randint(0, mcfg.vocab_size, (3, 16), generator=g)
    labels = torch.randint(0, mcfg.vocab_size, (3, 16), generator=g)
    calls = [0]
    for block in model.h:
        block.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    rng.seed_all(seed, tp_rank=ctx.tp_rank)                     # same dropout stream every run
    loss = model(ids, labels)
    loss.backward()
    n = len(model.h)
    expect = n + (len(range(0, n, every)) if every else 0)      # recomputed blocks run twice
    assert calls[0] == expect, f"{calls[0]} block forwards, expected {expect} (every={every})"
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    missing = [n for n, gr in grads.items() if gr is None]
    assert not missing, missing
    return float(loss.item()), grads


def _diff(a, b):
    la, ga = a
    lb, gb = b
    worst = max((ga[n] - gb[n]).abs().max().item() for n in ga)
    return {"loss_a": la, "loss_b": lb, "loss_diff": abs(la - lb), "grad_diff": worst}


def worker(rank: int, out: str) -> None:
    from gpt_dist.config import ParallelConfig
    from gpt_dist.parallel import ParallelContext

    result: dict = {}
    with ParallelContext.from_env(ParallelConfig(tp=2), device="cpu", timeout_s=300) as ctx:
        torch.use_deterministic_algorithms(True)
        no_drop, drop = _model_cfg(0.0), _model_cfg(0.1)

        base = _run(ctx, no_drop, sp=False)
        result["sp_vs_none"] = _diff(base, _run(ctx, no_drop, sp=True))

        for sp in (False, True):
            ref = _run(ctx, drop, sp=sp)
            again = _run(ctx, drop, sp=sp)
            result[f"dropout_repeatable_sp{int(sp)}"] = _diff(ref, again)
            for every in (1, 2):
                for part in (False, True):
                    result[f"ac_every{every}_part{int(part)}_sp{int(sp)}"] = _diff(
                        ref, _run(ctx, drop, sp=sp, every=every, partition=part))
        # dropout really is on: same weights and data, dropout 0 vs 0.1 differ
        result["dropout_active"] = _diff(base, _run(ctx, drop, sp=False))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    os.makedirs(sys.argv[1], exist_ok=True)
    helpers.run_ranks(worker, 2, sys.argv[1], timeout=540)
