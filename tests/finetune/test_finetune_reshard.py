"""Fine-tuning resumed in another layout (issue 19): the task head, the optimizer state, the
schedule position, the epoch position and the best-checkpoint record carry over.

Runs (tests/finetune/_ft_worker.py, the one fine-tuning launch): multiple choice, 2 epochs of
24 steps, dropout 0 (classifier dropout too), lr 1e-3, validation every 8 steps, a checkpoint
every 12. A reference runs uninterrupted in one layout; the resumed run starts in a new run
directory holding only the reference's step-12 checkpoint (mid-epoch, with the step-8 best
record) and trains steps 13-48 in another layout:

    xl_pp2   (pp=2, ZeRO-1)          -> xl_pp2_to_dp2z2 (dp=2, ZeRO-2)
    xl_dp2z3 (dp=2, ZeRO-3, all partitioned) -> xl_dp2z3_to_1 (one rank, ZeRO-0)

Each resumed run must take the reference's steps: losses and task metrics to 1e-5 relative,
the same learning rate and consumed samples, the same example ids per step, the same
validation results and best record, and the console line naming both layouts.

Validation's auxiliary ``lm_loss`` is the mean over every LM token of the validation set
(``TaskObjective.predict``), whatever the micro-batches and ranks; it used to average each
micro-batch's token mean weighted by its examples, padding slots included, and so depended on
the data-parallel size (~4e-5 relative between dp=1 and dp=2 here). Every validation value is
compared with the run's own reference and with the uninterrupted run of the resumed run's dp
size (the other pair's reference).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

STOP, STEPS = 12, 48
REL = 1e-5
STEP_METRICS = ("loss", "lm_loss", "task_loss", "task_acc")
# (reference, resumed, the reference's layout, the resumed run's, the uninterrupted run of the
# resumed run's data-parallel size: see below)
PAIRS = [
    ("xl_pp2", "xl_pp2_to_dp2z2", "tp=1 pp=2 dp=1 zero=1 fp32", "tp=1 pp=1 dp=2 zero=2 fp32", "xl_dp2z3"),
    ("xl_dp2z3", "xl_dp2z3_to_1", "tp=1 pp=1 dp=2 zero=3 fp32", "tp=1 pp=1 dp=1 zero=0 fp32", "xl_pp2"),
]
IDS = [p[1] for p in PAIRS]


def _rel(a: float, b: float) -> float:
    return 0.0 if a == b else abs(a - b) / max(abs(a), abs(b))


def _evals(run: Path) -> dict[int, dict[str, float]]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_metrics"] for r in recs if "val_metrics" in r}


def _train_state(run: Path, step: int) -> dict[str, Any]:
    return json.loads((run / "checkpoints" / f"global_step{step}" / "manifest.json").read_text())["train_state"]


def _assert_val_equal(got: dict[str, float], own: dict[str, float], same_dp: dict[str, float], where: str) -> None:
    """Validation metrics: each to REL of the reference's and of the uninterrupted run of the
    resumed run's data-parallel size (see above)."""
    assert got.keys() == own.keys() == same_dp.keys(), (where, got, own)
    for key, value in got.items():
        assert _rel(value, own[key]) <= REL, (where, key, value, own[key], got, own, same_dp)
        assert _rel(value, same_dp[key]) <= REL, (where, key, value, same_dp[key], got, own, same_dp)


def _assert_state_equal(got: dict[str, Any], own: dict[str, Any], same_dp: dict[str, Any], where: str) -> None:
    """TrainState dicts: counters exactly, the validation loss and the best record to REL."""
    assert got.keys() == own.keys(), where
    for key in ("step", "consumed_samples", "skipped_steps", "consecutive_skips", "tokens_seen"):
        assert got[key] == own[key], (where, key, got[key], own[key])
    assert _rel(got["last_val_loss"], own["last_val_loss"]) <= REL, (where, got, own)  # L2 (task_loss)
    gb, wb = got["best"], own["best"]
    assert wb is not None and gb is not None, (where, gb, wb)
    assert (gb["step"], gb["metric"]) == (wb["step"], wb["metric"]), (where, gb, wb)
    assert _rel(gb["value"], wb["value"]) <= REL, (where, gb, wb)
    if gb["step"] <= STOP:  # the record the checkpoint carried: the reference's own, unchanged
        assert gb == wb, (where, gb, wb)
    else:
        _assert_val_equal(gb["metrics"], wb["metrics"], same_dp["best"]["metrics"], where)


@pytest.mark.parametrize("ref,resumed,old,new,same_dp", PAIRS, ids=IDS)
def test_resumed_in_another_layout_takes_the_uninterrupted_steps(ft_runs, ref, resumed, old, new, same_dp):
    want = {r["step"]: r for r in ft_runs.records(ref)}
    got = {r["step"]: r for r in ft_runs.records(resumed)}
    assert sorted(want) == list(range(1, STEPS + 1)), sorted(want)
    assert sorted(got) == list(range(STOP + 1, STEPS + 1)), sorted(got)  # >= 20 steps after the stop
    worst = dict.fromkeys(STEP_METRICS, 0.0)
    for step, r in got.items():
        w = want[step]
        # the epoch position: the same example ids in every step (digest of the global ids)
        assert r["samples_sha"] == w["samples_sha"], (step, r["samples_sha"], w["samples_sha"])
        assert r["consumed_samples"] == w["consumed_samples"] == 8 * step, (step, r, w)
        assert r["lr"] == pytest.approx(w["lr"], rel=1e-12, abs=0.0), (step, r["lr"], w["lr"])
        for key in STEP_METRICS:
            worst[key] = max(worst[key], _rel(r[key], w[key]))
    print(f"\n{resumed}: max relative difference over steps {STOP + 1}-{STEPS}: {worst}")
    assert all(v <= REL for v in worst.values()), (resumed, worst)


@pytest.mark.parametrize("ref,resumed,old,new,same_dp", PAIRS, ids=IDS)
def test_resumed_in_another_layout_validates_and_keeps_the_best_record(ft_runs, ref, resumed, old, new, same_dp):
    out = ft_runs.out
    for key in STEP_METRICS:  # the two references take the same steps, so either may be the same-dp one
        assert all(_rel(x, y) <= REL for x, y in zip(ft_runs.by_step(ref, key), ft_runs.by_step(same_dp, key),
                                                     strict=True)), key
    # the checkpoint copied at step 12 carries a best record (step 8): the resumed run must
    # keep it, not start a new one at its first validation
    at_stop = _train_state(out / ref, STOP)
    assert at_stop["best"] is not None and at_stop["best"]["step"] == 8, at_stop
    want_ev, got_ev, dp_ev = _evals(out / ref), _evals(out / resumed), _evals(out / same_dp)
    assert sorted(want_ev) == sorted(dp_ev) == [8, 16, 24, 32, 40, 48], (want_ev, dp_ev)
    assert sorted(got_ev) == [16, 24, 32, 40, 48], got_ev
    for step, metrics in got_ev.items():
        _assert_val_equal(metrics, want_ev[step], dp_ev[step], f"{resumed} validation at step {step}")
    # every checkpoint the reference wrote after the stop (periodic and best), the resumed run
    # wrote too, with the same train state (best record included)
    def tags(run: str) -> list[str]:
        return sorted(p.name for p in (out / run / "checkpoints").glob("global_step*")
                      if int(p.name.removeprefix("global_step")) > STOP)

    assert tags(ref) and tags(ref) == tags(resumed) == tags(same_dp), (tags(ref), tags(resumed), tags(same_dp))
    for tag in tags(ref):
        step = int(tag.removeprefix("global_step"))
        _assert_state_equal(_train_state(out / resumed, step), _train_state(out / ref, step),
                            _train_state(out / same_dp, step), f"{resumed} {tag}")
    a, b, c = ft_runs.results(ref), ft_runs.results(resumed), ft_runs.results(same_dp)
    assert a["final_step"] == b["final_step"] == STEPS
    assert a["best"]["step"] == b["best"]["step"] and _rel(a["best"]["value"], b["best"]["value"]) <= REL, (a, b)
    _assert_val_equal(b["valid"], a["valid"], c["valid"], f"{resumed} results.json")


@pytest.mark.parametrize("ref,resumed,old,new,same_dp", PAIRS, ids=IDS)
def test_resume_in_a_new_layout_is_one_console_line(ft_runs, ref, resumed, old, new, same_dp):
    tag = ft_runs.out / resumed / "checkpoints" / f"global_step{STOP}"
    lines = [line for line in ft_runs.log.splitlines() if line.startswith("resume in a new layout:")]
    mine = [line for line in lines if f"{tag} written" in line]
    assert len(mine) == 1, lines
    assert f"written at {old}, this run {new};" in mine[0], mine[0]
    assert f"step {STOP}, {8 * STOP} samples consumed" in mine[0], mine[0]
    assert f"resumed from {tag} (step {STOP}, {8 * STOP} samples consumed)" in ft_runs.log
    # the reference itself never resumed
    assert f"{ft_runs.out / ref}/checkpoints" not in "\n".join(lines)


def test_resumed_run_keeps_the_best_record_it_carried(ft_runs):
    """``xl_pp2``'s step-40 checkpoint is its best so far, and step 48's validation only ties
    it; resumed there on one rank (ZeRO-0), the run must keep step 40 as its best: a run that
    lost the record would take step 48 (any value beats no record) and export it."""
    ref, resumed, out = "xl_pp2", "xl_pp2_at40_to_1", ft_runs.out
    carried = _train_state(out / ref, 40)["best"]
    ev = _evals(out / ref)
    assert carried["step"] == 40 and ev[48]["accuracy"] <= carried["value"], (
        "the synthetic tasks changed: resume from a checkpoint whose best the next validation does not beat",
        carried, ev)
    want = {r["step"]: r for r in ft_runs.records(ref)}
    got = {r["step"]: r for r in ft_runs.records(resumed)}
    assert sorted(got) == list(range(41, STEPS + 1)), sorted(got)
    for step, r in got.items():
        assert r["samples_sha"] == want[step]["samples_sha"] and r["lr"] == want[step]["lr"], step
        assert all(_rel(r[k], want[step][k]) <= REL for k in STEP_METRICS), (step, r, want[step])
    assert _train_state(out / resumed, STEPS)["best"] == carried
    res = ft_runs.results(resumed)
    assert res["best"] == carried == ft_runs.results(ref)["best"], (res["best"], carried)
    assert f"at step {STEPS}: exported to {out / resumed / 'best'}" not in ft_runs.log
    # with the best model (step 40, the copied RUN/best) validated again: the reference's numbers
    _assert_val_equal(res["valid"], ft_runs.results(ref)["valid"], ft_runs.results(ref)["valid"], resumed)
    line = f"resume in a new layout: {out / resumed}/checkpoints/global_step40 written at tp=1 pp=2 dp=1 zero=1 fp32, "
    assert line + "this run tp=1 pp=1 dp=1 zero=0 fp32;" in ft_runs.log
