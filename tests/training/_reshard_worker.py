"""Every run of tests/training/test_reshard.py in ONE launch (process start-up and the DeepSpeed
import cost ~15 s per launch on 2 cores): 4 ranks, then 2, then 1, each world a ``with
ParallelContext`` block (as tests/training/_parallel_worker.py does).

    python tests/training/_reshard_worker.py OUT DATA_PREFIX

Every run is the real trainer (``pretrain`` with the context passed in), 60 steps at learning
rate 1e-3, dropout 0, a checkpoint every 10 steps. A *reference* runs uninterrupted in the
layout that writes the checkpoint; a *resumed* run starts in a new run directory holding only
the reference's step-10 checkpoint (and the run's manifest key), in another layout, and
trains steps 11-60. Right after loading, a resumed run writes the layout-free state it holds
(``reshard.write_state``) to RUN/loaded/, which the test compares with the checkpoint's.

A. world 4: ``w4_tp2dp2_z1`` (tp=2 x dp=2, ZeRO-1): the reference of the lost-node case.
B. world 2: references ``dp2_z3`` (ZeRO-3, dp=2), ``pp2_z1`` (pp=2, ZeRO-1), ``tp2_z0`` (tp=2,
   ZeRO-0 fp32: the torch optimizer's own state); resumed ``dp2z3_to_tp2z1``,
   ``pp2_to_dp2z2``, ``tp2_to_pp2``, ``w4_to_tp2`` (4 ranks -> 2), ``w4_to_dp2z3`` (4 ranks
   tp=2 -> 2 ranks ZeRO-3, every parameter partitioned), the negative control
   ``dp2z3_to_tp2z1_no_optim`` (Adam state not restored), ``tp2sp_z2`` (tp=2 with sequence
   parallelism, ZeRO-2) resumed as ``tp2sp_to_pp2z1`` (pp=2, ZeRO-1), and ``tp2_to_pp2_twice`` (resumed
   in pp=2, stopped at step 30, started again: the second start resumes natively).
   Where the CPU has bf16: ``dp2_z1_bf16`` (dp=2, ZeRO-1, bf16) resumed as ``bf16_z1_to_z3``
   (ZeRO-3, bf16): the fp32 master weights, not their bf16 copies, must carry over.
C. world 1: ``dp2z3_to_1`` (ZeRO-3 dp=2 -> one rank, ZeRO-0).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpt_dist.training.hooks import TrainHooks
from tests import helpers
from tests.helpers import VOCAB

T_START = float(os.environ.get("GPT_DIST_TEST_T0", time.time()))
STEPS, STOP = 60, 10

TOY: dict = {
    "run": {"name": "reshard"},
    "model": {"n_layer": 2, "n_embd": 32, "n_ctx": 16, "vocab_size": VOCAB, "dropout": 0.0, "attn_dropout": 0.0},
    "optimizer": {"lr": 1e-3, "min_lr": 1e-4},
    "schedule": {"warmup_steps": 5, "decay_steps": STEPS},
    "data": {"seq_len": 16, "split": "90,10,0"},
    "training": {"micro_batch_size": 2, "global_batch_size": 8, "eval_interval": 1000, "eval_steps": 1,
                 "seed": 1234, "train_steps": STEPS},
    "checkpoint": {"save_interval": STOP, "keep_last": 10},
    "logging": {"log_interval": 1000, "tensorboard": False},
}
BUCKETS = {"reduce_bucket_size": 200_000, "allgather_bucket_size": 200_000,
           "stage3_prefetch_bucket_size": 200_000}
TIMES: dict[str, float] = {}


def _config(run_dir: Path, data: str, *, tp: int = 1, pp: int = 1, stage: int = 0, precision: str = "fp32",
            sp: bool = False):
    zero = {**BUCKETS, "stage": stage, **(helpers.zero3() if stage == 3 else {})}
    return helpers.toy_config(run_dir, [data], **{**TOY, "parallel": {"tp": tp, "pp": pp, "sequence_parallel": sp},
                                                  "training": {**TOY["training"], "precision": precision},
                                                  "deepspeed": {"zero_optimization": zero}})


def _bf16() -> bool:
    from gpt_dist.device import precision_problem

    return precision_problem("bf16", "cpu") is None


class Probe(TrainHooks):
    """After loading: the layout-free state this run holds, written to RUN/loaded/. Optionally
    a stop at ``stop_at`` (the loop saves and returns) or the Adam state not restored."""

    def __init__(self, cfg, *, stop_at: int | None = None, restore_optim: bool = True) -> None:
        self.cfg, self.stop_at, self.restore_optim = cfg, stop_at, restore_optim

    def after_resume(self, eng, ctx, tag_dir, resharded) -> None:
        from gpt_dist.training import reshard

        out = self.cfg.run_dir / "loaded"
        out.mkdir(parents=True, exist_ok=True)
        section = reshard.write_state(eng, ctx, self.cfg, out, lambda path, fn, state: fn(path))
        if ctx.is_main:
            (out / "section.json").write_text(json.dumps({**section, "resharded": resharded}))
        ctx.barrier()

    def on_step_start(self, step, ctx, stop) -> None:
        if self.stop_at is not None and step == self.stop_at + 1:
            stop.signum = 15

    def should_restore(self, what: str) -> bool:
        return what != "optim" or self.restore_optim


def _reference(ctx, out: Path, data: str, name: str, **layout) -> None:
    import gpt_dist.training.pretrain as L

    t0 = time.monotonic()
    L.pretrain(_config(out / name, data, **layout), ctx)
    TIMES[name] = round(time.monotonic() - t0, 2)


def _resumed(ctx, out: Path, data: str, name: str, source: str, *, stop_at: int | None = None,
             restore_optim: bool = True, **layout) -> None:
    """A new run directory with only ``source``'s step-10 checkpoint, trained in ``layout``."""
    import gpt_dist.training.pretrain as L

    t0 = time.monotonic()
    run = out / name
    if ctx.is_main:
        helpers.copy_checkpoint(out / source, run, f"global_step{STOP}")
    ctx.barrier()
    cfg = _config(run, data, **layout)
    L.pretrain(cfg, ctx, hooks=Probe(cfg, stop_at=stop_at, restore_optim=restore_optim))
    if stop_at is not None:  # started again in the same layout: DeepSpeed's own files
        L.pretrain(cfg, ctx, hooks=Probe(cfg))
    TIMES[name] = round(time.monotonic() - t0, 2)


def worker(rank: int, out: str, data: str) -> None:
    os.environ["GPT_DIST_PG_TIMEOUT"] = "240"
    o = Path(out)
    import gpt_dist.training.metrics as M

    M.plot_loss = lambda run_dir: None  # loss.png: matplotlib costs seconds per run, not tested here

    with helpers.world(rank, 4, tp=2) as ctx:  # ---- A: world 4
        _reference(ctx, o, data, "w4_tp2dp2_z1", tp=2, stage=1)
        port = helpers.next_world_port(ctx)
    if rank >= 2:
        return
    with helpers.world(rank, 2, port=port) as ctx:  # ---- B: world 2, tp=1 x dp=2
        _reference(ctx, o, data, "dp2_z3", stage=3)
        if _bf16():  # the CI machine may lack bf16: the test then skips
            _reference(ctx, o, data, "dp2_z1_bf16", stage=1, precision="bf16")
        port = helpers.next_world_port(ctx)
    with helpers.world(rank, 2, tp=2, port=port) as ctx:  # ---- B': tp=2
        _reference(ctx, o, data, "tp2_z0", tp=2, stage=0)
        _resumed(ctx, o, data, "dp2z3_to_tp2z1", "dp2_z3", tp=2, stage=1)
        _resumed(ctx, o, data, "dp2z3_to_tp2z1_no_optim", "dp2_z3", tp=2, stage=1, restore_optim=False)
        _resumed(ctx, o, data, "w4_to_tp2", "w4_tp2dp2_z1", tp=2, stage=1)
        port = helpers.next_world_port(ctx)
        _reference(ctx, o, data, "tp2sp_z2", tp=2, stage=2, sp=True)
        port = helpers.next_world_port(ctx)
    with helpers.world(rank, 2, pp=2, port=port) as ctx:  # ---- B'': pp=2
        _reference(ctx, o, data, "pp2_z1", pp=2, stage=1)
        _resumed(ctx, o, data, "tp2_to_pp2", "tp2_z0", pp=2, stage=0)
        _resumed(ctx, o, data, "tp2_to_pp2_twice", "tp2_z0", pp=2, stage=0, stop_at=30)
        _resumed(ctx, o, data, "tp2sp_to_pp2z1", "tp2sp_z2", pp=2, stage=1)
        port = helpers.next_world_port(ctx)
    with helpers.world(rank, 2, port=port) as ctx:  # ---- B''': dp=2 again
        _resumed(ctx, o, data, "pp2_to_dp2z2", "pp2_z1", stage=2)
        _resumed(ctx, o, data, "w4_to_dp2z3", "w4_tp2dp2_z1", stage=3)
        if _bf16():
            _resumed(ctx, o, data, "bf16_z1_to_z3", "dp2_z1_bf16", stage=3, precision="bf16")
        port = helpers.next_world_port(ctx)
    if rank >= 1:
        return
    with helpers.world(0, 1, port=port) as ctx:  # ---- C: one rank
        _resumed(ctx, o, data, "dp2z3_to_1", "dp2_z3", stage=0)
    (o / "times.json").write_text(json.dumps(TIMES, indent=1))
    (o / "done").write_text("ok\n")


if __name__ == "__main__":
    out_dir, data_prefix = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    os.environ["GPT_DIST_TEST_T0"] = str(T_START)
    helpers.preload_trainer()
    helpers.run_ranks(worker, 4, out_dir, data_prefix, timeout=900)
