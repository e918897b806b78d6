"""T7: non-finite loss on one rank only: a collective skip, counted and checkpointed.

Run (a), shared with T5's ``continue`` policy: rank 1's loss is inf at step 6
(GPT_DIST_TEST_INF_STEPS=6, INF_RANK=1); rank 1's step-4 save fails with ENOSPC (dropped,
on_disk_full=continue); checkpoints at 8; rank 0 is killed at the start of step 10 and the
restart resumes from global_step8.

Policy asserted: a skipped step leaves the weights and Adam moments untouched on every rank,
but counts as a step - the LR schedule, the step counter and consumed_samples advance (the
batch is consumed). ``skipped`` is saved in the checkpoint and restored.
(b) three consecutive non-finite steps stop the job with exit code 17.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.reliability import conftest as c
from tests.reliability import harness as h


@pytest.fixture(scope="module")
def inf_run(rel_tmp, data) -> h.Result:
    return c.launch(rel_tmp, data, "t7a", max_restarts=1, training__train_steps=10,
                    checkpoint__on_disk_full="continue",
                    env={"GPT_DIST_TEST_INF_STEPS": "6", "GPT_DIST_TEST_INF_RANK": "1",
                         "GPT_DIST_TEST_ENOSPC_AT": "4:1", "GPT_DIST_TEST_KILL_AT": "10:0"})


@pytest.mark.slow
def test_skip_is_collective_and_state_unchanged(inf_run, ref_metrics):
    res = inf_run
    assert res.rc == 0, res.describe()
    m = h.metrics(res.run_dir)
    assert m[5]["state_sha"] == ref_metrics[5]["state_sha"]  # identical run up to the skip
    assert m[6]["loss"] == float("inf")
    # both ranks skipped: weights and optimizer state unchanged across step 6, on each rank
    assert m[6]["state_sha"] == m[5]["state_sha"]
    assert [m[s]["skipped"] for s in range(1, 11)] == [0] * 5 + [1] * 5
    # a skipped step counts: LR schedule and data position advance as in the reference
    assert m[7]["lr"] == ref_metrics[7]["lr"]
    assert m[7]["consumed_samples"] == ref_metrics[7]["consumed_samples"]
    assert m[7]["state_sha"] != m[6]["state_sha"]  # training goes on afterwards
    assert "non-finite loss on some rank; update skipped" in res.output


@pytest.mark.slow
def test_skip_count_checkpointed_and_resume_exact(inf_run):
    res = inf_run
    assert res.rc == 0 and res.restarts == 1, res.describe()
    root = res.run_dir / "checkpoints"
    manifest = json.loads((root / "global_step8" / "manifest.json").read_text())
    assert manifest["train_state"]["skipped_steps"] == 1
    recs = h.all_records(res.run_dir)
    steps = [r["step"] for r in recs]
    assert steps == list(range(1, 10)) + [9, 10], steps
    # step 9 of the first attempt and of the resumed one: bit-exact, skip count restored
    assert h.diff_runs({9: recs[8]}, {9: recs[9]}) == []
    assert recs[9]["skipped"] == 1


@pytest.mark.slow
def test_disk_full_continue_policy(inf_run):
    """T5 (B): the dropped save leaves nothing behind; the next save commits."""
    res = inf_run
    assert res.rc == 0, res.describe()
    assert "DROPPED (disk full) at step 4" in res.output
    root = res.run_dir / "checkpoints"
    assert not (root / "global_step4").exists()
    assert (root / "latest").read_text() == "global_step10"
    assert (root / "global_step8" / "manifest.json").exists()


@pytest.mark.slow
def test_three_consecutive_nonfinite_exit_17(rel_tmp, data):
    res = c.launch(rel_tmp, data, "t7b", training__train_steps=6,
                   env={"GPT_DIST_TEST_INF_STEPS": "2,3,4", "GPT_DIST_TEST_INF_RANK": "1"})
    assert res.rc != 0, res.describe()
    assert "exitcode  : 17" in res.output or "exitcode: 17" in res.output, res.describe()
    m = h.metrics(res.run_dir)
    assert max(m) == 4 and m[4]["skipped"] == 3
    assert "3 consecutive non-finite steps" in res.output


# --------------------------------------------------------------------------- loss scaler unit


def _scaler(monkeypatch, **kw):
    from deepspeed.runtime.fp16 import loss_scaler

    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda: 0)
    args = {"init_scale": 2.0**16, "scale_window": 4, "min_scale": 1.0, "delayed_shift": 1,
                "consecutive_hysteresis": False, "raise_error_at_min_scale": True}
    args.update(kw)
    return loss_scaler.DynamicLossScaler(**args)


def test_loss_scaler_halves_grows_and_stops(monkeypatch):
    s = _scaler(monkeypatch)
    from deepspeed.runtime.fp16.loss_scaler import has_inf_or_nan

    # (DynamicLossScaler.has_overflow_serial itself is broken in DeepSpeed 0.19.8: its
    # _has_inf_or_nan lacks @staticmethod; the fp16 optimizers use the module function.)
    assert has_inf_or_nan(torch.tensor([1.0, float("inf"), 0.0]))  # overflow -> skip ...
    s.update_scale(True)
    assert s.cur_scale == 2.0**15  # ... and the scale halves
    for _ in range(4):
        s.update_scale(False)
    assert s.cur_scale == 2.0**15
    s.update_scale(False)  # grows after loss_scale_window clean steps
    assert s.cur_scale == 2.0**16
    s = _scaler(monkeypatch, init_scale=2.0, min_scale=1.0)
    s.update_scale(True)
    assert s.cur_scale == 1.0
    with pytest.raises(Exception, match="already at minimum"):
        s.update_scale(True)


def test_loss_scaler_hysteresis(monkeypatch):
    s = _scaler(monkeypatch, delayed_shift=2)
    s.update_scale(True)
    assert s.cur_scale == 2.0**16 and s.cur_hysteresis == 1  # first overflow only spends hysteresis
    s.update_scale(True)
    assert s.cur_scale == 2.0**15


def test_loss_scaler_state_round_trips_through_checkpoint(monkeypatch, tmp_path):
    s = _scaler(monkeypatch)
    for overflow in (True, False, False, True, False):
        s.update_scale(overflow)
    keys = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
    torch.save({k: getattr(s, k) for k in keys}, tmp_path / "scaler.pt")
    loaded = torch.load(tmp_path / "scaler.pt", weights_only=True)
    t = _scaler(monkeypatch)
    for k, v in loaded.items():
        setattr(t, k, v)
    for overflow in (False, False, False, False, True):
        s.update_scale(overflow)
        t.update_scale(overflow)
        assert [getattr(s, k) for k in keys] == [getattr(t, k) for k in keys]
