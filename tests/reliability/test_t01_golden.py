"""T1: two identical runs are bitwise equal, and match the golden losses (same versions)."""

from __future__ import annotations

import math
import os

import pytest

from tests.reliability import conftest as c
from tests.reliability import golden
from tests.reliability import harness as h

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def second_run(rel_tmp, data) -> h.Result:
    res = c.launch(rel_tmp, data, "ref2")
    assert res.rc == 0, res.describe()
    return res


def test_two_runs_bitwise_equal(ref_metrics, second_run):
    other = h.metrics(second_run.run_dir)
    assert sorted(other) == sorted(ref_metrics)
    assert h.diff_runs(ref_metrics, other) == []
    assert all(math.isfinite(r["loss"]) for r in ref_metrics.values())
    # the tiny model learns: the loss goes down over the run
    assert ref_metrics[c.STEPS]["loss"] < ref_metrics[1]["loss"]


def test_golden(ref_metrics):
    if os.environ.get("GPT_DIST_REGEN_GOLDEN") == "1":
        golden.write(ref_metrics)
        pytest.skip(f"regenerated {golden.GOLDEN}")
    if not golden.GOLDEN.exists():
        pytest.skip(f"no golden file {golden.GOLDEN}: regenerate with GPT_DIST_REGEN_GOLDEN=1")
    gold = golden.load()
    if gold["versions"] != golden.versions():
        pytest.skip(f"golden was made with {gold['versions']}, this is {golden.versions()}: "
                    "regenerate golden (GPT_DIST_REGEN_GOLDEN=1 or python -m tests.reliability.golden)")
    steps = {int(s): v for s, v in gold["steps"].items()}
    assert sorted(steps) == list(range(1, c.STEPS + 1)), "golden file is missing steps"
    bad = []
    for s in sorted(steps):
        if s not in ref_metrics:  # a missing step fails, never a silent pass
            bad.append(f"step {s}: not logged")
            continue
        for k in golden.KEYS:
            if not abs(ref_metrics[s][k] - steps[s][k]) <= 1e-6:
                bad.append(f"step {s} {k}: {ref_metrics[s][k]!r} vs golden {steps[s][k]!r}")
    assert bad == []
