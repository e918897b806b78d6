"""Every multi-process run of tests/training/test_stages.py in ONE launch (issue 20: the
pipeline under ZeRO-2/3, one DeepSpeed engine per stage, ``gpt_dist/training/stages.py``).

    python tests/training/_stages_worker.py OUT DATA_PREFIX

The real trainer (``pretrain`` with the context passed in) on the toy GPT-2 of
_parallel_worker.py, dropout 0, lr 1e-3, global batch 8 x 16 tokens, 100 steps:

A. world 4, pp=2 x dp=2 (micro-batch 2: M = 2 micro-batches per step = pp):
   ``pp2dp2_z3`` (ZeRO-3, every parameter partitioned), ``pp2dp2_z2`` (ZeRO-2),
   ``pp2dp2_z3_gpipe`` (ZeRO-3, GPipe order: every backward follows a backward);
   ``untied`` (ZeRO-3, 10 steps, the tied gradients NOT summed: the negative control);
   ``pp2dp2_z3_preempted`` (a stop signal before step 7, started again, another before step 12,
   started again: each start resumes natively); ``pp2dp2_z3_nan`` (8 steps, rank 3's loss
   made inf at step 5).
   30 steps each: ``pp2dp2_z3_ac`` (activation checkpointing), ``pp2dp2_z3_gpt1`` (GPT-1),
   ``pp2dp2_z3_recompute`` (``parallel.stage_recompute``).
B. world 4, tp=2 x pp=2 (dp=1, micro-batch 2: M = 4 > pp): ``tp2pp2_z3``; 30 steps of
   ``tp2pp2_z3_sp`` (sequence parallelism); 10 steps with dropout 0.1 of ``tp2pp2_drop`` and
   ``tp2pp2_drop_recompute`` (the same with stage_recompute); ``z2_to_tp2pp2z3``: pp2dp2_z2's step-50
   checkpoint resumed in this layout (a resume in a new layout, steps 51-100).
C. world 1: ``ref`` (pp=1, ZeRO-0); ``z3_to_1``: pp2dp2_z3's step-50 checkpoint resumed on
   one rank; 30 steps of ``ref_short`` and ``ref_gpt1`` (the
   data order depends on the run's length: megatron-core's dataset indexes train_steps x batch).

Each pipeline run records, every step, the largest difference between the first and the last
stage's copies of the tied embedding (``tied_diff``, fp32 masters) and, at its first step, how
ZeRO-3 holds each parameter (tests/faults.py ``Zero3Report``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests import helpers
from tests.training._parallel_worker import BUCKETS, TOY

STEPS = 100
SHORT = 30  # what else must keep working: activation checkpointing, GPT-1, sequence parallelism


def config(out: Path, data: str, name: str, *, tp: int, pp: int, stage: int, steps: int = STEPS,
           schedule: str = "1f1b", arch: str = "gpt2", save: int = 1000, dropout: float = 0.0,
           **par_extra) -> dict:
    zero = {**BUCKETS, "stage": stage, **(helpers.zero3() if stage == 3 else {})}
    par = {"tp": tp, "pp": pp, **({"pipeline_schedule": schedule} if pp > 1 else {}), **par_extra}
    return helpers.toy_config(out / name, [data], **{
        **TOY, "parallel": par, "optimizer": {"lr": 1e-3, "weight_decay": 0.01},
        "schedule": {"warmup_steps": 10, "decay_steps": STEPS},
        "training": {**TOY["training"], "train_steps": steps, "eval_interval": 50},
        "model": {**TOY["model"], "arch": arch, "dropout": dropout, "attn_dropout": dropout},
        "checkpoint": {"save_interval": save, "keep_last": 2},
        "deepspeed": {"zero_optimization": zero}})


def tied_check():
    """Hooks recording ``tied_diff`` every step, plus the ZeRO-3 partition report."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from tests.faults import Zero3Report

    class TiedCheck(Zero3Report):
        def after_step(self, record, eng, ctx) -> None:
            super().after_step(record, eng, ctx)
            tied = [p for n, p in eng.ds.module.named_parameters() if n == "tied_modules.embed.wte.weight"]
            mine = safe_get_full_fp32_param(tied[0])
            other = mine.clone()
            dist.all_reduce(other, group=ctx.embedding_group)  # first + last stage copy
            diff = (other - 2 * mine).abs().max()              # (theirs - mine) on each stage
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            record["tied_diff"] = float(diff)
            if record["step"] == 1:  # what each rank holds of its stage's optimizer state
                state = [t for s in eng.optimizer.state.values() for k, t in s.items() if k == "exp_avg"]
                stage = sum(int(getattr(p, "ds_numel", p.numel())) for p in eng.ds.module.parameters())
                record["adam_held"] = ctx.all_gather_objects([sum(t.numel() for t in state), stage])

    return TiedCheck()


def stop_at(at: int, also=None):
    """Hooks: every rank saves and stops before step ``at`` (what SIGTERM/SIGUSR1 do)."""
    from tests.faults import Zero3Report

    class Stop(Zero3Report):
        def on_step_start(self, step, ctx, stop) -> None:
            if step == at:
                stop.signum = 15

        def after_step(self, record, eng, ctx) -> None:
            super().after_step(record, eng, ctx)
            if also is not None:
                also(record, eng, ctx)

    return Stop()


def _state_sha(record, eng, ctx) -> None:
    from tests.faults import state_sha

    record["state_sha"] = state_sha(eng, ctx)


def nonfinite(ctx, outp: Path, data: str) -> None:
    """``pp2dp2_z3_nan``: the last stage's loss on rank 3 is made inf at step 5 (the loss
    function the schedule calls, replaced here): every rank must skip that update."""
    from gpt_dist.training import stages

    flag = {"step": 0}
    original = stages._loss_is_output

    def poisoned(output, target):
        return output * float("inf") if flag["step"] == 5 and ctx.rank == 3 else output

    class Step(stop_at(10 ** 9, _state_sha).__class__):
        def on_step_start(self, step, ctx_, stop) -> None:
            flag["step"] = step

    import gpt_dist.training.pretrain as L

    stages._loss_is_output = poisoned
    try:
        L.pretrain(config(outp, data, "pp2dp2_z3_nan", tp=1, pp=2, stage=3, steps=8), ctx, hooks=Step())
    finally:
        stages._loss_is_output = original


def worker(rank: int, out: str, data: str) -> None:
    os.environ["GPT_DIST_PG_TIMEOUT"] = "240"
    outp = Path(out)
    import gpt_dist.training.metrics as M
    import gpt_dist.training.pretrain as L
    from gpt_dist.training import stages

    M.plot_loss = lambda run_dir: None

    with helpers.world(rank, 4, pp=2) as ctx:
        L.pretrain(config(outp, data, "pp2dp2_z3", tp=1, pp=2, stage=3, save=50), ctx, hooks=tied_check())
        L.pretrain(config(outp, data, "pp2dp2_z2", tp=1, pp=2, stage=2, save=50), ctx, hooks=tied_check())
        # preempted twice (a signal before steps 7 and 12), resumed each time: steps 1-11 as pp2dp2_z3
        for at in (7, 12):
            L.pretrain(config(outp, data, "pp2dp2_z3_preempted", tp=1, pp=2, stage=3), ctx, hooks=stop_at(at))
        nonfinite(ctx, outp, data)
        L.pretrain(config(outp, data, "pp2dp2_z3_gpipe", tp=1, pp=2, stage=3, schedule="gpipe"), ctx,
                   hooks=tied_check())
        L.pretrain(config(outp, data, "pp2dp2_z3_ac", tp=1, pp=2, stage=3, steps=SHORT,
                          activation_checkpointing="full"), ctx, hooks=tied_check())
        L.pretrain(config(outp, data, "pp2dp2_z3_gpt1", tp=1, pp=2, stage=3, steps=SHORT, arch="gpt1"), ctx,
                   hooks=tied_check())
        L.pretrain(config(outp, data, "pp2dp2_z3_recompute", tp=1, pp=2, stage=3, steps=SHORT, stage_recompute=True),
                   ctx, hooks=tied_check())
        summed = stages.StagedPipelineEngine.sum_tied_grads
        stages.StagedPipelineEngine.sum_tied_grads = lambda self: None  # negative control
        try:
            L.pretrain(config(outp, data, "untied", tp=1, pp=2, stage=3, steps=10), ctx, hooks=tied_check())
        finally:
            stages.StagedPipelineEngine.sum_tied_grads = summed
        port = helpers.next_world_port(ctx)
    with helpers.world(rank, 4, tp=2, pp=2, port=port) as ctx:
        L.pretrain(config(outp, data, "tp2pp2_z3", tp=2, pp=2, stage=3), ctx, hooks=tied_check())
        L.pretrain(config(outp, data, "tp2pp2_z3_sp", tp=2, pp=2, stage=3, steps=SHORT, sequence_parallel=True),
                   ctx, hooks=tied_check())
        # recomputed stages replay the dropout masks (the TP region's RNG tracker included)
        for name, rc in (("tp2pp2_drop", False), ("tp2pp2_drop_recompute", True)):
            L.pretrain(config(outp, data, name, tp=2, pp=2, stage=3, steps=10, dropout=0.1, stage_recompute=rc),
                       ctx, hooks=tied_check())
        # into the stage engines from another layout: pp2dp2 ZeRO-2's step-50 checkpoint, resumed at tp2 x pp2 ZeRO-3
        if rank == 0:
            helpers.copy_checkpoint(outp / "pp2dp2_z2", outp / "z2_to_tp2pp2z3", "global_step50")
        ctx.barrier()
        L.pretrain(config(outp, data, "z2_to_tp2pp2z3", tp=2, pp=2, stage=3), ctx, hooks=tied_check())
        port = helpers.next_world_port(ctx)
    if rank >= 1:
        return
    with helpers.world(0, 1, port=port) as ctx:
        L.pretrain(config(outp, data, "ref", tp=1, pp=1, stage=0), ctx)
        # out of the stage engines: pp2dp2 ZeRO-3's step-50 checkpoint, resumed on one rank
        helpers.copy_checkpoint(outp / "pp2dp2_z3", outp / "z3_to_1", "global_step50")
        L.pretrain(config(outp, data, "z3_to_1", tp=1, pp=1, stage=0), ctx)
        L.pretrain(config(outp, data, "ref_short", tp=1, pp=1, stage=0, steps=SHORT), ctx)
        L.pretrain(config(outp, data, "ref_gpt1", tp=1, pp=1, stage=0, steps=SHORT, arch="gpt1"), ctx)
    (outp / "done").write_text("ok\n")


if __name__ == "__main__":
    out_dir, data_prefix = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    helpers.preload_trainer()
    helpers.run_ranks(worker, 4, out_dir, data_prefix, timeout=840)
