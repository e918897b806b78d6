"""Every multi-process run of tests/training/test_stages.py in ONE launch (issue 20: the
pipeline under ZeRO-2/3, one DeepSpeed engine per stage, ``gpt_dist/training/stages.py``).

    python tests/training/_stages_worker.py OUT DATA_PREFIX

The real trainer (``pretrain`` with the context passed in) on the toy GPT-2 of
_parallel_worker.py, dropout 0, lr 1e-3, global batch 8 x 16 tokens, 100 steps:

A. world 4, pp=2 x dp=2 (micro-batch 2: M = 2 micro-batches per step = pp):
   ``pp2dp2_z3`` (ZeRO-3, every parameter partitioned), ``pp2dp2_z2`` (ZeRO-2),
   ``pp2dp2_z3_gpipe`` (ZeRO-3, GPipe order: every backward follows a backward);
   ``untied`` (ZeRO-3, 10 steps, the tied gradients NOT summed: the negative control).
   30 steps each: ``pp2dp2_z3_ac`` (activation checkpointing), ``pp2dp2_z3_gpt1`` (GPT-1).
B. world 4, tp=2 x pp=2 (dp=1, micro-batch 2: M = 4 > pp): ``tp2pp2_z3``; 30 steps of
   ``tp2pp2_z3_sp`` (sequence parallelism).
C. world 1: ``ref`` (pp=1, ZeRO-0) and 30 steps of ``ref_short`` and ``ref_gpt1`` (the
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
           schedule: str = "1f1b", arch: str = "gpt2", **par_extra) -> dict:
    zero = {**BUCKETS, "stage": stage, **(helpers.zero3() if stage == 3 else {})}
    par = {"tp": tp, "pp": pp, **({"pipeline_schedule": schedule} if pp > 1 else {}), **par_extra}
    return helpers.toy_config(out / name, [data], **{
        **TOY, "parallel": par, "optimizer": {"lr": 1e-3, "weight_decay": 0.01},
        "schedule": {"warmup_steps": 10, "decay_steps": STEPS},
        "training": {**TOY["training"], "train_steps": steps, "eval_interval": 50},
        "model": {**TOY["model"], "arch": arch, "dropout": 0.0, "attn_dropout": 0.0},
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

    return TiedCheck()


def worker(rank: int, out: str, data: str) -> None:
    os.environ["GPT_DIST_PG_TIMEOUT"] = "240"
    outp = Path(out)
    import gpt_dist.training.metrics as M
    import gpt_dist.training.pretrain as L
    from gpt_dist.training import stages

    M.plot_loss = lambda run_dir: None

    with helpers.world(rank, 4, pp=2) as ctx:
        L.pretrain(config(outp, data, "pp2dp2_z3", tp=1, pp=2, stage=3), ctx, hooks=tied_check())
        L.pretrain(config(outp, data, "pp2dp2_z2", tp=1, pp=2, stage=2), ctx, hooks=tied_check())
        L.pretrain(config(outp, data, "pp2dp2_z3_gpipe", tp=1, pp=2, stage=3, schedule="gpipe"), ctx,
                   hooks=tied_check())
        L.pretrain(config(outp, data, "pp2dp2_z3_ac", tp=1, pp=2, stage=3, steps=SHORT,
                          activation_checkpointing="full"), ctx, hooks=tied_check())
        L.pretrain(config(outp, data, "pp2dp2_z3_gpt1", tp=1, pp=2, stage=3, steps=SHORT, arch="gpt1"), ctx,
                   hooks=tied_check())
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
        port = helpers.next_world_port(ctx)
    if rank >= 1:
        return
    with helpers.world(0, 1, port=port) as ctx:
        L.pretrain(config(outp, data, "ref", tp=1, pp=1, stage=0), ctx)
        L.pretrain(config(outp, data, "ref_short", tp=1, pp=1, stage=0, steps=SHORT), ctx)
        L.pretrain(config(outp, data, "ref_gpt1", tp=1, pp=1, stage=0, steps=SHORT, arch="gpt1"), ctx)
    (outp / "done").write_text("ok\n")


if __name__ == "__main__":
    out_dir, data_prefix = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    helpers.preload_trainer()
    helpers.run_ranks(worker, 4, out_dir, data_prefix, timeout=840)
