"""T19: a run resumed in a new layout keeps the exact-resume guarantee in that layout (issue 19).

A resume in another layout loads the layout-free state (``training/reshard.py``) and
re-derives the RNG from (seed, step); from then on the run is an ordinary run of its new
layout, and a ``kill -9`` followed by torchrun's restart must continue it bit for bit, as T2
asserts for a run that never changed layout. Three launches:

* A: the reference run (ZeRO-1, dp=2; conftest ``ref_run``, shared with T1-T5);
* B: a new run directory seeded with A's step-4 checkpoint, trained at dp=2 under ZeRO-3
  (every parameter partitioned); attempt 0 resumes in the new layout, saves global_step8
  itself and is SIGKILLed (rank 1) at the start of step 10; attempt 1 resumes natively from
  B's own global_step8 and trains to step 12;
* C: the same as B without the kill.

B's final records (loss, grad_norm, lr, skipped, consumed_samples, samples_sha, state_sha)
equal C's at every step, its step 9 before and after the kill agree, and its final checkpoint
equals C's tensor for tensor. Dropout stays on (the suite's config): B and C compare in one
layout, so any difference is a bug, and the native resume must restore the RNG stream that
the new-layout resume derived. A layout change against the original layout's run (dropout 0,
1e-5 relative) is tests/training/test_reshard.py's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import helpers
from tests.reliability import conftest as c
from tests.reliability import harness as h

pytestmark = pytest.mark.slow

SEED_TAG = "global_step4"  # A's checkpoint that B and C start from
OWN_TAG = "global_step8"   # B's first checkpoint of its own, written in the new layout
KILL_STEP = 10
NEW_LAYOUT = "written at tp=1 pp=1 dp=2 zero=1 fp32, this run tp=1 pp=1 dp=2 zero=3 fp32"


def _launch_new_layout(rel_tmp: Path, data: Path, ref_run: h.Result, name: str, **kw) -> h.Result:
    assert ref_run.rc == 0, ref_run.describe()
    return c.launch(rel_tmp, data, name, deepspeed={"zero_optimization": helpers.zero3()},
                    prepare=lambda d: h.copy_checkpoint(ref_run.run_dir, d, SEED_TAG), **kw)


@pytest.fixture(scope="module")
def killed(rel_tmp, data, ref_run) -> h.Result:
    return _launch_new_layout(rel_tmp, data, ref_run, "t19_killed", max_restarts=1,
                              env={"GPT_DIST_TEST_KILL_AT": f"{KILL_STEP}:1"})


@pytest.fixture(scope="module")
def uninterrupted(rel_tmp, data, ref_run) -> h.Result:
    return _launch_new_layout(rel_tmp, data, ref_run, "t19_uninterrupted")


def _starts(output: str) -> list[str]:
    """The resume lines of the job's console, in order (rank 0 logs them)."""
    return [line for line in output.splitlines()
            if "resume in a new layout:" in line or "resumed from" in line]


def test_uninterrupted_run_resumes_in_the_new_layout_once(uninterrupted):
    res = uninterrupted
    assert res.rc == 0, res.describe()
    assert res.restarts == 0, res.describe()
    starts = _starts(res.output)
    assert len(starts) == 2, starts
    assert "resume in a new layout:" in starts[0] and NEW_LAYOUT in starts[0], starts
    assert SEED_TAG in starts[1], starts
    recs = h.all_records(res.run_dir)
    assert [r["step"] for r in recs] == list(range(5, c.STEPS + 1))
    assert helpers.assert_zero3_partitioned(recs, dp=2) == 1


def test_kill9_after_a_new_layout_resume_restarts_natively(killed):
    res = killed
    assert res.rc == 0, res.describe()
    assert res.restarts == 1, res.describe()
    # rank 1 of the first attempt died by SIGKILL (torchrun's report of the failed worker)
    assert "failed (exitcode: -9) local_rank: 1 " in res.output, res.describe()
    starts = _starts(res.output)
    # attempt 0: the new-layout resume from A's checkpoint (two lines); attempt 1: a native
    # resume of B's own checkpoint, in B's layout (a same-layout resume logs no layout line)
    assert len(starts) == 3, starts
    assert "resume in a new layout:" in starts[0] and NEW_LAYOUT in starts[0], starts
    assert SEED_TAG in starts[1], starts
    assert starts[2].startswith(f"resumed from {res.run_dir / 'checkpoints' / OWN_TAG} (step 8,"), starts
    assert res.output.count("resume in a new layout:") == 1, res.describe()

    recs = h.all_records(res.run_dir)
    steps = [r["step"] for r in recs]
    # attempt 0 logged 5..9 (killed at the start of 10), attempt 1 resumed at 8 and logged 9..12
    assert steps == list(range(5, KILL_STEP)) + list(range(9, c.STEPS + 1)), steps
    first, second = {r["step"]: r for r in recs[:5]}, {r["step"]: r for r in recs[5:]}
    assert h.diff_runs(first, second, steps=[9]) == []
    # both attempts really ran partitioned ZeRO-3
    assert helpers.assert_zero3_partitioned(recs, dp=2) == 2


def test_kill9_restart_equals_the_uninterrupted_run(killed, uninterrupted):
    assert killed.rc == 0 and uninterrupted.rc == 0, (killed.describe(), uninterrupted.describe())
    ours, ref = h.metrics(killed.run_dir), h.metrics(uninterrupted.run_dir)
    steps = list(range(5, c.STEPS + 1))
    assert sorted(ours) == sorted(ref) == steps
    # every compared key is logged (state_sha included), so the equality below is not vacuous
    assert all(set(h.COMPARED) <= set(ref[s]) for s in steps), ref[steps[0]].keys()
    assert h.diff_runs(ref, ours, steps=steps) == []


def test_final_checkpoint_equals_the_uninterrupted_runs(killed, uninterrupted):
    from safetensors.torch import load_file

    assert killed.rc == 0 and uninterrupted.rc == 0
    tag = f"global_step{c.STEPS}"
    ours, ref = killed.run_dir / "checkpoints" / tag, uninterrupted.run_dir / "checkpoints" / tag
    pts = sorted(p.name for p in ref.glob("*.pt"))
    assert pts == sorted(p.name for p in ours.glob("*.pt"))
    keys = ("module", "optimizer_state_dict", "lr_scheduler", "global_steps", "global_samples")
    tensors, compared = 0, set()
    for name in pts:
        a = torch.load(ref / name, map_location="cpu", weights_only=False)  # our own test output
        b = torch.load(ours / name, map_location="cpu", weights_only=False)
        if name.startswith("rng_"):
            tensors += h.same_objects(a, b, name)
            compared.add("rng")
            continue
        for key in keys:
            if key in a:
                tensors += h.same_objects(a[key], b[key], f"{name}:{key}")
                compared.add(key)
    # the layout-free files too: full fp32 weights and Adam moments by GPT-2 name
    lf = sorted(p.name for p in ref.glob("lf_*.safetensors"))
    assert lf and lf == sorted(p.name for p in ours.glob("lf_*.safetensors"))
    for name in lf:
        tensors += h.same_objects(load_file(str(ref / name)), load_file(str(ours / name)), name)
    assert {"optimizer_state_dict", "lr_scheduler", "rng"} <= compared, (pts, compared)
    assert tensors > 0
