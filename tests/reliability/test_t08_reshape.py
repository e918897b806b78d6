"""T8: reshaping a checkpoint to another parallel layout.

Policy (README, "Changing the parallel layout"): a checkpoint with layout-free state (every
checkpoint by default) resumes in any layout with its whole training state
(tests/training/test_reshard.py). One without it (``checkpoint.layout_free: false``, or an
older writer: the fake saver here) resumes only in its own layout; another tp/pp (or, with
ZeRO, another dp) is refused with a message naming both layouts, never silently
re-initialised. Moving weights alone goes through ``launch/export.py`` and
``checkpoint.init_from``: the weights are kept exactly; the optimizer state (Adam moments,
step count) and the LR schedule position are dropped, and the new run starts at step 0.

* unit (fake saver, no processes): the refusal, for tp, pp and ZeRO dp changes;
* slow, two launches: a TP=2 run (dropout 0) trains 2 steps and evaluates; its export is
  the TP=2 shards merged bit for bit; a TP=1 run ``init_from`` the export (one no-op step,
  lr 1e-30) evaluates the same validation batches within 1e-6 relative of the TP=2 run, and
  its own checkpoint exports to the same bits again. The TP=2 checkpoint itself is planned
  as a resume in a new layout by a TP=1 run (``reshard.plan_resume``, both layouts named).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpt_dist.training import checkpoint as ckpt
from gpt_dist.training import loop
from tests.reliability import conftest as c
from tests.reliability import fake
from tests.reliability import harness as h
from tests.reliability.test_t04_corrupt import Log, _cfg

NO_DROPOUT = {"dropout": 0.0, "attn_dropout": 0.0}


def _resume(run_dir: Path, ctx: fake.FakeCtx, zero_stage: int = 1, **model):
    eng = fake.FakeEngine()
    cfg = _cfg(run_dir, **model)
    cfg.deepspeed["zero_optimization"]["stage"] = zero_stage
    return eng, loop.resume(cfg, ctx, type("E", (), {"ds": eng})(), loop.TrainState(), Log())


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}, {"dp": 2}])
def test_resume_under_another_layout_is_refused_naming_both(tmp_path, layout):
    fake.make_run(tmp_path)  # written with tp=1 pp=1 dp=1
    eng = None
    with pytest.raises(ckpt.CheckpointError) as info:
        eng, _ = _resume(tmp_path, fake.FakeCtx(**layout))
    msg = str(info.value)
    want = {"tp": 1, "pp": 1, "dp": 1, **layout}
    assert "written at tp=1 pp=1 dp=1" in msg and "without layout-free state" in msg
    assert f"this run is tp={want['tp']} pp={want['pp']} dp={want['dp']}" in msg
    assert "checkpoint.init_from" in msg and "global_step10" in msg and "\n" not in msg
    assert eng is None  # nothing loaded


def test_dp_change_without_zero_resumes(tmp_path):
    """ZeRO-0 keeps the whole optimizer state on every rank: a dp change is no reshape."""
    fake.make_run(tmp_path)
    eng, state = _resume(tmp_path, fake.FakeCtx(dp=2), zero_stage=0)
    assert eng.loads == ["global_step10"] and state.step == 10


def _merged_shards(tag: Path, cfg) -> dict[str, torch.Tensor]:
    """The TP=2 checkpoint's weights merged independently of gpt_dist.export (torch.cat)."""
    from gpt_dist.export import canonical_name, tp_dim

    shards = [torch.load(tag / f"mp_rank_{r:02d}_model_states.pt", weights_only=True)["module"]
              for r in range(2)]
    out = {}
    for name in shards[0]:
        canon = canonical_name(name, cfg.n_layer)
        if canon is None:
            continue
        dim = tp_dim(canon)
        out[canon] = shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim)
    out["wte.weight"] = out["wte.weight"][: cfg.vocab_size]
    return out


def _val_loss(run_dir: Path, step: int) -> float:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in recs if "val_loss" in r and r["step"] == step]
    assert vals, f"{run_dir}: no validation loss at step {step}"
    return vals[-1]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
def test_tp2_to_tp1_through_export_keeps_weights_and_loss(rel_tmp, data):
    from gpt_dist.config import ModelConfig
    from gpt_dist.export import export_checkpoint

    model = {**h.BASE_CONFIG["model"], **NO_DROPOUT}
    common = {"model": model, "training__train_steps": 2, "checkpoint__save_interval": 2,
                  "training__eval_interval": 2, "checkpoint__keep_last": 1}
    src = c.launch(rel_tmp, data, "t8_tp2", parallel={"tp": 2, "pp": 1}, **common)
    assert src.rc == 0, src.describe()
    src_val = [r for r in h.all_records(src.run_dir) if r.get("step") == 2]
    assert src_val and src_val[0]["skipped"] == 0
    val_tp2 = _val_loss(src.run_dir, 2)

    # the TP=2 checkpoint -> one layout-free export: the shards merged, bit for bit
    tag = src.run_dir / "checkpoints" / "global_step2"
    cfg = ModelConfig(**model)
    export_checkpoint(src.run_dir, rel_tmp / "t8_export")
    exported = _tensors(rel_tmp / "t8_export" / "model.safetensors")
    merged = _merged_shards(tag, cfg)
    assert set(exported) == set(merged)
    for k in merged:
        assert torch.equal(exported[k], merged[k]), k

    # resuming the TP=2 checkpoint at TP=1: planned as a resume in a new layout, both named
    from gpt_dist.training import reshard

    tp1 = _cfg(src.run_dir, **model)
    tp1.training.global_batch_size = h.BASE_CONFIG["training"]["global_batch_size"]
    plan = reshard.plan_resume(tp1, new=reshard.Layout(1, 1, 1, 1, "fp32"))
    assert plan is not None and plan.reshard, plan
    assert "written at tp=2 pp=1 dp=1" in plan.describe() and "this run tp=1 pp=1 dp=1" in plan.describe()

    # TP=1 from the export: a no-op step, then the same validation batches
    dst_dir = rel_tmp / "t8_tp1"
    dst_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = h.make_config(rel_tmp / "t8_tp1.json", dst_dir, data, model=model,
                             training__train_steps=1, checkpoint__save_interval=1, training__eval_interval=1, optimizer={"lr": 1e-30, "weight_decay": 0.0}, schedule={"warmup_steps": 0, "decay": "constant"}, checkpoint__init_from=str(rel_tmp / "t8_export"))
    dst = h.torchrun(cfg_path, dst_dir, nproc=1, env=c.STATE_SHA, timeout=300)
    assert dst.rc == 0, dst.describe()
    val_tp1 = _val_loss(dst_dir, 1)
    assert abs(val_tp1 - val_tp2) <= 1e-6 * abs(val_tp2), (val_tp1, val_tp2)
    # the loaded weights are the TP=2 run's: its own (TP=1) checkpoint exports to the same bits
    export_checkpoint(dst_dir, rel_tmp / "t8_export_again")
    again = _tensors(rel_tmp / "t8_export_again" / "model.safetensors")
    assert [k for k in exported if not torch.equal(exported[k], again[k])] == []
