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


#: Relative tolerance against the golden of another CPU capability. Measured on an AMD EPYC
#: (AVX512) with torch's dispatch forced by ATEN_CPU_CAPABILITY: the AVX2 and AVX512 runs are
#: bitwise equal and match both files; forced DEFAULT kernels, and DEFAULT with MKL and oneDNN
#: held to SSE4 (an old CPU all the way down), differ from them by at most 4.8e-7 in a loss
#: (7e-8 relative) and 6e-7 relative in a gradient norm. 1e-5 leaves a 100x margin over that.
#: A real regression moves far more: one step of training changes the loss by 4e-3..5e-2
#: here, so a data-position, RNG-stream, schedule or gradient change (a skipped or repeated
#: batch, another dropout mask, another clip) is hundreds of tolerances away.
ACROSS_CAPABILITIES = 1e-5


def _check_golden(metrics: dict, cap: str) -> None:
    """Exact (the file's 6 decimals) where ``cap`` has a golden file made with the same
    numeric libraries; within ACROSS_CAPABILITIES of the nearest capability's file where it
    has none; skipped only when the numeric libraries differ from every file's, with the
    command that regenerates it."""
    mine = golden.numeric_versions(golden.versions())
    usable = [c for c in golden.recorded()
              if golden.numeric_versions(golden.load(golden.path_for(c))["versions"]) == mine]
    if not usable:
        pytest.skip(f"no golden file made with {mine} (have {golden.recorded()}): regenerate "
                    "with GPT_DIST_REGEN_GOLDEN=1 or python -m tests.reliability.golden")
    near = golden.nearest(cap, usable)
    steps = {int(s): v for s, v in golden.load(golden.path_for(near))["steps"].items()}
    assert sorted(steps) == list(range(1, c.STEPS + 1)), "golden file is missing steps"
    rel = 0.0 if near == cap else ACROSS_CAPABILITIES
    bad = golden.compare(metrics, steps, rel)
    assert bad == [], (f"CPU capability {cap}, compared with the {near} golden "
                       f"({'exact' if rel == 0 else f'relative {rel:g}'}); if the change is intended, "
                       "regenerate: GPT_DIST_REGEN_GOLDEN=1")


def test_golden(ref_metrics):
    """The reference run against the golden of this CPU's capability (or the nearest one;
    test_two_runs_bitwise_equal holds every machine to bitwise repeats of its own runs)."""
    if os.environ.get("GPT_DIST_REGEN_GOLDEN") == "1":
        golden.write(ref_metrics)
        pytest.skip(f"regenerated {golden.GOLDEN}")
    _check_golden(ref_metrics, golden.capability())


def test_golden_on_a_capability_without_a_file(rel_tmp, data):
    """The path a CPU without a recorded capability takes, taken on this one: the reference
    run with torch's DEFAULT (unvectorised) kernels forced, held to the nearest file with
    the cross-capability tolerance (exactly, should a DEFAULT file ever be recorded)."""
    res = c.launch(rel_tmp, data, "ref_default_kernels", env={"ATEN_CPU_CAPABILITY": "default"})
    assert res.rc == 0, res.describe()
    metrics = h.metrics(res.run_dir)
    assert sorted(metrics) == list(range(1, c.STEPS + 1))
    _check_golden(metrics, "DEFAULT")


def test_nearest_capability():
    """Which file a CPU without its own golden is held to."""
    assert golden.nearest("AVX512", ["AVX2", "AVX512"]) == "AVX512"
    assert golden.nearest("DEFAULT", ["AVX2", "AVX512"]) == "AVX2"
    assert golden.nearest("AVX512", ["AVX2"]) == "AVX2"
    assert golden.nearest("AVX2", ["DEFAULT", "AVX512"]) == "DEFAULT"  # a tie: the narrower
    assert golden.nearest("NEON", ["AVX2", "AVX512"]) == "AVX2"  # another architecture
    assert golden.nearest("AVX2", []) is None


def test_compare_catches_what_a_regression_does():
    """The tolerance passes last-bit noise and fails a shifted step (the size of a real
    regression: the same losses one batch late), and a missing step."""
    gold = {int(s): v for s, v in golden.load(golden.path_for(golden.recorded()[0]))["steps"].items()}
    noisy = {s: {**v, "loss": v["loss"] * (1 + 3e-6)} for s, v in gold.items()}
    assert golden.compare(noisy, gold, ACROSS_CAPABILITIES) == []
    assert golden.compare(noisy, gold, 0.0) != []  # but not exact
    shifted = {s: {**gold[s], "loss": gold[min(s + 1, c.STEPS)]["loss"]} for s in gold}
    assert len(golden.compare(shifted, gold, ACROSS_CAPABILITIES)) >= c.STEPS - 2
    assert golden.compare({s: v for s, v in gold.items() if s != 5}, gold, 1.0) == ["step 5: not logged"]
