"""Tensor parallelism, data parallelism and ZeRO-0..3 compute the same thing (CPU, gloo).

All numbers come from one 4-process launch (conftest.py, _parallel_worker.py) of the real
trainer (``gpt_dist.training.pretrain.pretrain``): a 2-layer, 32-wide GPT-2 on toy shards,
fp32, dropout 0, global batch 8 x 16 tokens, 10 steps, the same seed everywhere. The model's
initialisation depends only on (seed, parameter name), so every layout starts from the same
weights and must take the same steps. The ZeRO-3 runs partition every parameter over dp=2
(persistence threshold 0, tests/helpers.py ``zero3``), which each test checks in the run's
own report, so forward and backward really gather and release them.

Resuming: test_resume.py (same launch).
"""

from __future__ import annotations

import pytest

from tests import helpers

pytestmark = pytest.mark.slow

TOL = 1e-5
STEPS = 10


def _max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == STEPS, (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("arch", ["gpt1", "gpt2"])
def test_tp2_forward_and_gradients_equal_tp1(runs, arch):
    tp1, tp2 = runs.fwd_bwd(f"tp1_{arch}"), runs.fwd_bwd(f"tp2_{arch}")
    assert abs(tp1["loss"] - tp2["loss"]) <= TOL, (tp1["loss"], tp2["loss"])
    assert tp1["count"] == tp2["count"] == tp1["analytic"]  # every TP shard counted once
    g1, g2 = tp1["grads"], tp2["grads"]
    assert sorted(g1) == sorted(g2)
    assert sum(n.endswith("weight") for n in g1) >= 8, sorted(g1)  # the model's weights are all here
    for name in g1:
        assert g1[name].shape == g2[name].shape, (name, g1[name].shape, g2[name].shape)
        diff = (g1[name] - g2[name]).abs().max().item()
        assert diff <= TOL, f"{arch} {name}: gathered TP=2 gradient differs by {diff:.3g}"
    # the comparison is not vacuous: every weight got a gradient
    assert all(g.abs().max().item() > 0 for n, g in g1.items() if n.endswith("weight")), \
        [n for n, g in g1.items() if g.abs().max().item() == 0]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_equals_zero0(runs, stage):
    ref, got = runs.losses("dp2_zero0"), runs.losses(f"dp2_zero{stage}")
    if stage == 3:
        assert helpers.assert_zero3_partitioned(runs.records("dp2_zero3"), dp=2) == 1
    assert _max_diff(ref, got) <= TOL, list(zip(ref, got, strict=True))
    assert abs(runs.val_loss("dp2_zero0") - runs.val_loss(f"dp2_zero{stage}")) <= TOL


def test_dp2_equals_dp1_with_the_same_global_batch(runs):
    ref, got = runs.losses("dp1_zero0"), runs.losses("dp2_zero0")
    assert _max_diff(ref, got) <= TOL, list(zip(ref, got, strict=True))
    assert abs(runs.val_loss("dp1_zero0") - runs.val_loss("dp2_zero0")) <= TOL


def test_tp2_dp2_zero3_trains_and_matches_tp1(runs):
    got = runs.losses("tp2dp2_zero3")
    assert got[-1] < got[0] - 0.05, got  # it learns
    assert helpers.assert_zero3_partitioned(runs.records("tp2dp2_zero3"), dp=2) == 1
    ref = runs.losses("dp2_zero0")
    assert _max_diff(ref, got) <= TOL, list(zip(ref, got, strict=True))
    assert abs(runs.val_loss("dp2_zero0") - runs.val_loss("tp2dp2_zero3")) <= TOL


def test_grad_norm_logged_and_equal_across_layouts(runs):
    """Every layout logs the same (clipping) gradient norm; ZeRO-0 in fp32 logged nan."""
    ref = runs.records("dp2_zero1")
    assert [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for name in ("dp2_zero0", "dp2_zero2", "dp2_zero3", "dp1_zero0", "tp2dp2_zero3"):
        got = runs.records(name)
        assert [r["step"] for r in got] == list(range(1, STEPS + 1)), name
        for a, b in zip(ref, got, strict=True):
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5, (name, a["step"], a["grad_norm"], b["grad_norm"])
