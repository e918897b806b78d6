"""Resume: a run stopped after step k and started again equals the uninterrupted run.

kill -9 mid-run, torchrun's restart and the bit-exact continuation are
tests/reliability/test_t02_kill_restart.py (tp=1, ZeRO-1 and ZeRO-3, dropout on, with
negative controls that switch single restores off) and tests/pipeline (pp=2 and
tp=2 x pp=2, dropout off). This file covers the layouts those do not: ZeRO-2, and
tp=2 x dp=2 with ZeRO-3 (every parameter partitioned) and dropout on (the per-TP-rank
dropout generator must be restored: without the RNG restore the losses differ from step 6).
The runs come from the shared launch of conftest.py (_parallel_worker.py): 10 steps, or 5
steps then 10 in the same run directory (the second start resumes from global_step5).
"""

from __future__ import annotations

import pytest

from tests import helpers

pytestmark = pytest.mark.slow

TOL = 1e-6  # the bar for a resumed run on CPU (in practice these are bit-equal)


def _max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == 10, (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("ref,resumed", [("dp2_zero2", "dp2_zero2_resumed"),
                                         ("tp2dp2_zero3_drop", "tp2dp2_zero3_drop_resumed")])
def test_stopped_and_resumed_run_equals_uninterrupted(runs, ref, resumed):
    assert runs.steps(resumed) == list(range(1, 11)), runs.steps(resumed)  # resumed at 6, not 1
    # this run's own second start loaded its own step-5 checkpoint
    tag = runs.out / resumed / "checkpoints" / "global_step5"
    assert f"resumed from {tag} (step 5, 40 samples consumed)" in runs.second_start_log(resumed)
    if "zero3" in ref:  # both starts ran partitioned ZeRO-3, and so did the reference
        assert helpers.assert_zero3_partitioned(runs.records(resumed), dp=2) == 2
        assert helpers.assert_zero3_partitioned(runs.records(ref), dp=2) == 1
    a, b = runs.losses(ref), runs.losses(resumed)
    assert _max_diff(a, b) <= TOL, list(zip(a, b, strict=True))
    assert abs(runs.val_loss(ref) - runs.val_loss(resumed)) <= TOL


def test_dropout_is_on_in_the_resume_run(runs):
    """Otherwise the RNG restore would go untested: dropout 0.1 changes the losses."""
    assert _max_diff(runs.losses("tp2dp2_zero3"), runs.losses("tp2dp2_zero3_drop")) > 1e-4

