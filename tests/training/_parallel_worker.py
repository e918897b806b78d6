"""Every multi-process measurement of tests/training in ONE launch (process start-up and the
DeepSpeed import cost ~15 s per launch on 2 cores; the runs themselves take seconds).

    python tests/training/_parallel_worker.py OUT DATA_PREFIX

The parent imports DeepSpeed, megatron-core and the trainer once and starts 4 ranks
(tests/helpers.py ``run_ranks``); they go through three worlds one after another, each a
``with ParallelContext`` block whose exit destroys its groups (world A's rendezvous is
run_ranks'; rank 0 picks B's and C's):

A. world 4 (ranks 0-3), tp=2 x dp=2:
   * ``tp2_{arch}.pt``: one forward + backward of the TP=2 GPT-1 and GPT-2 models (dropout 0,
     the same batch on every rank): the loss and every gradient gathered over the TP group
     into the full (unsharded) tensor;
   * ``tp2dp2_zero3/``: ``pretrain`` for 10 steps with ZeRO-3;
   * ``tp2dp2_zero3_drop/``: the same with dropout 0.1, and ``tp2dp2_zero3_drop_resumed/``:
     stopped after step 5 (its final checkpoint) and started again, resuming to step 10.
B. world 2 (ranks 0-1), tp=1 x dp=2: ``pretrain`` for 10 steps with ZeRO-0, 1, 2 and 3
   (``dp2_zero{S}/``), one after another in the same process group (``pretrain`` reseeds);
   ``dp2_zero2_resumed/``: ZeRO-2 stopped after step 5 and resumed.
C. world 1 (rank 0): ``dp1_zero0/`` (10 steps, the same global batch as B) and
   ``tp1_{arch}.pt`` (the TP=1 forward + backward that A's must equal).

Every run is the real trainer (``gpt_dist.training.pretrain.pretrain`` with the context passed
in), which writes its losses to RUN/metrics.jsonl; the test compares them. ZeRO-3 runs
partition every parameter (tests/helpers.py ``zero3``) and log how at their first step
(tests/faults.py ``Zero3Report``). The second start of an interrupted run writes what it
logged to RUN/second_start.log (the resume message of that run alone). A failing rank
fails the launch with its rank and traceback (run_ranks), which the tests show.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from tests import helpers
from tests.helpers import VOCAB

T_START = float(os.environ.get("GPT_DIST_TEST_T0", time.time()))
STEPS = 10

#: what these runs change in configs/tiny_cpu.json (tests/helpers.py ``toy_config``)
TOY: dict = {
    "run": {"name": "par"},
    "model": {"n_layer": 2, "n_embd": 32, "n_ctx": 16, "vocab_size": VOCAB},
    "schedule": {"warmup_steps": 3, "decay_steps": STEPS},  # also for 5-step runs
    "data": {"seq_len": 16, "split": "90,10,0"},
    "training": {"micro_batch_size": 2, "global_batch_size": 8, "eval_interval": STEPS, "eval_steps": 1,
                 "seed": 1234},
    "checkpoint": {"save_interval": 1000, "keep_last": 1},
    "logging": {"log_interval": 1000, "tensorboard": False},
}
# DeepSpeed's default buckets are 5e8 elements: a 2 GB torch.empty per bucket that takes
# seconds on a loaded 2-core machine; the toy model has 45k parameters
BUCKETS = {"reduce_bucket_size": 200_000, "allgather_bucket_size": 200_000,
           "stage3_prefetch_bucket_size": 200_000}


def _config(out: Path, data: str, name: str, *, tp: int, stage: int, steps: int = STEPS,
            dropout: float = 0.0):
    # ZeRO-3 really partitioned, not kept whole below the persistence threshold
    zero = {**BUCKETS, "stage": stage, **(helpers.zero3() if stage == 3 else {})}
    return helpers.toy_config(out / name, [data], **{
        **TOY, "parallel": {"tp": tp}, "training": {**TOY["training"], "train_steps": steps},
        "model": {**TOY["model"], "dropout": dropout, "attn_dropout": dropout},
        "deepspeed": {"zero_optimization": zero}})


TIMES: dict[str, float] = {}


def _timed(name: str, fn, *args, **kw):
    t0 = time.monotonic()
    out = fn(*args, **kw)
    TIMES[name] = round(time.monotonic() - t0, 2)
    return out


def _train(ctx, out: Path, data: str, name: str, *, stage: int, dropout: float = 0.0) -> None:
    import gpt_dist.training.pretrain as L
    from tests.faults import Zero3Report

    _timed(name, L.pretrain, _config(out, data, name, tp=ctx.tp, stage=stage, dropout=dropout), ctx,
           hooks=Zero3Report())


def _train_interrupted(ctx, out: Path, data: str, name: str, *, stage: int, dropout: float = 0.0) -> None:
    """Stop after step 5 (a checkpoint is written at the last step), then start the same run
    again for 10 steps: it resumes from global_step5 and logs steps 6-10 after 1-5."""
    import contextlib
    import io

    import gpt_dist.training.pretrain as L
    from tests.faults import Zero3Report

    t0 = time.monotonic()
    for steps in (5, STEPS):
        cfg = _config(out, data, name, tp=ctx.tp, stage=stage, steps=steps, dropout=dropout)
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):  # rank 0's run log is printed
            L.pretrain(cfg, ctx, hooks=Zero3Report())
        sys.stdout.write(captured.getvalue())
        if steps == STEPS and ctx.rank == 0:
            (out / name / "second_start.log").write_text(captured.getvalue())
    TIMES[name] = round(time.monotonic() - t0, 2)


def _forward_backward(ctx, arch: str) -> dict:
    """Loss and full gradients of one forward + backward (TP shards gathered)."""
    import torch.distributed as dist

    from gpt_dist import rng
    from gpt_dist.config import ModelConfig
    from gpt_dist.model.build import build_gpt as build_model
    from gpt_dist.model.gpt import analytic_parameters, count_parameters

    mcfg = ModelConfig(arch=arch, n_layer=2, n_head=4, n_embd=32, n_ctx=16, vocab_size=VOCAB,
                       dropout=0.0, attn_dropout=0.0)
    rng.seed_all(5, tp_rank=ctx.tp_rank)
    model = build_model(mcfg, ctx.tensor_parallel, seed=99).train()
    g = torch.Generator().manual_seed(11)  # the same batch on every rank
    ids = torch.randint(0, VOCAB, (3, 16), generator=g)
    labels = torch.randint(0, VOCAB, (3, 16), generator=g)
    loss = model(ids, labels)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.detach().clone()
        if ctx.tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(grad) for _ in range(ctx.tp)]
            dist.all_gather(parts, grad.contiguous(), group=ctx.tp_group)
            grad = torch.cat(parts, dim=p.partition_dim)
        grads[name] = grad
    return {"loss": float(loss.item()), "grads": grads, "padded_vocab": mcfg.padded_vocab_size(ctx.tp),
            "count": count_parameters(model, mcfg, tp=ctx.tp), "analytic": analytic_parameters(mcfg)}


def worker(rank: int, out: str, data: str) -> None:
    TIMES["start"] = round(time.time() - T_START, 2)
    os.environ["GPT_DIST_PG_TIMEOUT"] = "240"
    outp = Path(out)
    import gpt_dist.training.metrics as M

    M.plot_loss = lambda run_dir: None  # loss.png: matplotlib costs seconds per run, not tested here

    # ---- A: world 4, tp=2 x dp=2
    with _timed("init_A", helpers.world, rank, 4, tp=2) as ctx:
        for arch in ("gpt1", "gpt2"):
            res = _forward_backward(ctx, arch)
            if rank == 0:
                torch.save(res, outp / f"tp2_{arch}.pt")
        _train(ctx, outp, data, "tp2dp2_zero3", stage=3)
        # resume with dropout on: the TP-region RNG tracker, per-rank ZeRO-3 partitions
        _train(ctx, outp, data, "tp2dp2_zero3_drop", stage=3, dropout=0.1)
        _train_interrupted(ctx, outp, data, "tp2dp2_zero3_drop_resumed", stage=3, dropout=0.1)
        port = helpers.next_world_port(ctx)
    if rank >= 2:
        return

    # ---- B: world 2, tp=1 x dp=2, ZeRO-0..3 in the same process group
    with _timed("init_B", helpers.world, rank, 2, tp=1, port=port) as ctx:
        for stage in (0, 1, 2, 3):
            _train(ctx, outp, data, f"dp2_zero{stage}", stage=stage)
        _train_interrupted(ctx, outp, data, "dp2_zero2_resumed", stage=2)
        port = helpers.next_world_port(ctx)
    if rank >= 1:
        return

    # ---- C: world 1: the DP=1 run and the TP=1 forward/backward references
    with _timed("init_C", helpers.world, 0, 1, tp=1, port=port) as ctx:
        _train(ctx, outp, data, "dp1_zero0", stage=0)
        for arch in ("gpt1", "gpt2"):
            torch.save(_forward_backward(ctx, arch), outp / f"tp1_{arch}.pt")
    (outp / "times.json").write_text(json.dumps(TIMES, indent=1))
    (outp / "done").write_text("ok\n")


if __name__ == "__main__":
    out_dir, data_prefix = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    os.environ["GPT_DIST_TEST_T0"] = str(T_START)
    helpers.preload_trainer()
    TIMES["imports"] = round(time.time() - T_START, 2)
    helpers.run_ranks(worker, 4, out_dir, data_prefix, timeout=400)
