"""T20: ``kill -9`` mid-run under pipeline parallelism with ZeRO-3 resumes bit for bit (issue 20).

pp=2 x dp=2 under ZeRO-3 (every parameter partitioned over its stage's two data-parallel ranks)
runs as one DeepSpeed engine per stage (``gpt_dist/training/stages.py``); each stage writes its
own DeepSpeed files (``..._mp_rank_00_...`` on stage 0, ``..._mp_rank_01_...`` on stage 1,
``parallel.StageMPU``) into the same committed checkpoint. Two 4-rank launches of the reliability
runner (dropout on, 12 steps, a checkpoint every 4):

* killed: rank 3 (the last stage) SIGKILLed at the start of step 10; torchrun restarts the job,
  which resumes from global_step8 and trains to step 12;
* uninterrupted: the same without the kill.

Every logged record (loss, grad norm, lr, samples, per-rank parameter and optimizer digest)
equals at every step, and the final checkpoints are equal file for file, tensor for tensor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import helpers
from tests.reliability import conftest as c
from tests.reliability import harness as h

pytestmark = pytest.mark.slow

KILL_STEP = 10
LAYOUT = {"parallel__pp": 2, "training__global_batch_size": 16,
          "deepspeed": {"zero_optimization": helpers.zero3()}}


def _launch(rel_tmp: Path, data: Path, name: str, **kw) -> h.Result:
    run_dir = rel_tmp / name
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = h.make_config(rel_tmp / f"{name}.json", run_dir, data, **{**c.COMMON, **LAYOUT})
    return h.torchrun(cfg, run_dir, nproc=4, timeout=420, env={**c.STATE_SHA, **kw.pop("env", {})}, **kw)


@pytest.fixture(scope="module")
def killed(rel_tmp, data) -> h.Result:
    return _launch(rel_tmp, data, "t20_killed", max_restarts=1, env={"GPT_DIST_TEST_KILL_AT": f"{KILL_STEP}:3"})


@pytest.fixture(scope="module")
def uninterrupted(rel_tmp, data) -> h.Result:
    return _launch(rel_tmp, data, "t20_uninterrupted")


def test_kill9_under_pp_zero3_resumes_exactly(killed, uninterrupted):
    for res in (killed, uninterrupted):
        assert res.rc == 0, res.describe()
    assert killed.restarts == 1 and "failed (exitcode: -9) local_rank: 3 " in killed.output, killed.describe()
    assert f"resumed from {killed.run_dir / 'checkpoints' / 'global_step8'} (step 8," in killed.output
    recs = h.all_records(killed.run_dir)
    assert [r["step"] for r in recs] == list(range(1, KILL_STEP)) + list(range(9, c.STEPS + 1))
    # both attempts ran ZeRO-3 partitioned over each stage's dp=2 group
    assert helpers.assert_zero3_partitioned(recs, dp=2) == 2
    ours, ref = h.metrics(killed.run_dir), h.metrics(uninterrupted.run_dir)
    steps = list(range(1, c.STEPS + 1))
    assert sorted(ours) == sorted(ref) == steps
    assert all(set(h.COMPARED) <= set(ref[s]) for s in steps), ref[1].keys()
    assert h.diff_runs(ref, ours, steps=steps) == []


def test_each_stage_writes_its_own_files_and_the_final_checkpoints_are_equal(killed, uninterrupted):
    tag = f"global_step{c.STEPS}"
    ours, ref = killed.run_dir / "checkpoints" / tag, uninterrupted.run_dir / "checkpoints" / tag
    pts = sorted(p.name for p in ref.glob("*_states.pt"))
    # 2 stages x 2 dp ranks, model and optimizer states each, none overwritten by another stage
    assert pts == sorted(f"zero_pp_rank_{d}_mp_rank_{s:02d}_{kind}_states.pt"
                         for d in (0, 1) for s in (0, 1) for kind in ("model", "optim")), pts
    assert pts == sorted(p.name for p in ours.glob("*_states.pt"))
    keys = ("module", "optimizer_state_dict", "lr_scheduler", "global_steps", "global_samples")
    tensors, compared = 0, set()
    for name in pts:
        a = torch.load(ref / name, map_location="cpu", weights_only=False)  # our own test output
        b = torch.load(ours / name, map_location="cpu", weights_only=False)
        for key in keys:
            if key in a:
                tensors += h.same_objects(a[key], b[key], f"{name}:{key}")
                compared.add(key)
    assert {"optimizer_state_dict", "lr_scheduler", "global_steps"} <= compared and tensors > 0, compared
    lf = sorted(p.name for p in ref.glob("lf_*.safetensors"))
    assert lf and lf == sorted(p.name for p in ours.glob("lf_*.safetensors"))
    for name in lf:
        assert (ref / name).read_bytes() == (ours / name).read_bytes(), name
