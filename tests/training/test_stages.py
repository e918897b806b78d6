"""Pipeline parallelism under ZeRO-2/3 (issue 20): one DeepSpeed engine per stage driven by
torch's 1F1B/GPipe schedule (``gpt_dist/training/stages.py``) trains exactly what one rank does.

All runs come from one 4-process launch (_stages_worker.py): 100 steps at lr 1e-3, dropout 0,
the same seed and global batch everywhere, against ``ref`` (pp=1, ZeRO-0, one rank).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import helpers

pytestmark = pytest.mark.slow

TOL = 1e-5
WEIGHT_TOL = 1e-5  # absolute, after 100 steps at lr 1e-3 (Adam moves each weight by <= ~0.1)
WORKER = Path(__file__).with_name("_stages_worker.py")
LAYOUTS = ["pp2dp2_z3", "pp2dp2_z2", "pp2dp2_z3_gpipe", "tp2pp2_z3"]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stages")
    data = helpers.toy_shards(root / "data" / "toy", n_docs=300, lengths=(10, 80), seed=0)
    proc = subprocess.run([sys.executable, str(WORKER), str(root), str(data)], check=False,
                          capture_output=True, text=True,
                          timeout=900, env=helpers.child_env())
    assert proc.returncode == 0 and (root / "done").exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    (root / "worker.log").write_text(proc.stdout)  # rank 0's console: the resume lines
    return root


def _steps(out: Path, name: str) -> list[dict]:
    return [r for r in helpers.metrics_records(out / name) if "loss" in r and "step" in r]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("name", LAYOUTS)
def test_pipeline_under_zero_equals_one_rank(out, name):
    """Losses within 1e-5 relative over 100 steps; gradient norms and learning rates equal;
    validation equal. pp2dp2 runs M = pp = 2 micro-batches per step, tp2pp2 M = 4 > pp; GPipe
    runs every backward after another backward (ZeRO's reset-in-forward hazard)."""
    ref, got = _steps(out, "ref"), _steps(out, name)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, 101))
    assert got[-1]["loss"] < got[0]["loss"] - 0.1, (got[0]["loss"], got[-1]["loss"])  # it learns
    for a, b in zip(got, ref, strict=True):
        assert _rel(a["loss"], b["loss"]) <= TOL, (name, a["step"], a["loss"], b["loss"])
        assert _rel(a["grad_norm"], b["grad_norm"]) <= TOL, (name, a["step"], a["grad_norm"], b["grad_norm"])
        assert a["lr"] == b["lr"], (name, a["step"])
        assert a["samples_sha"] == b["samples_sha"], (name, a["step"])
    vals = {n: [r["val_loss"] for r in helpers.metrics_records(out / n) if "val_loss" in r] for n in (name, "ref")}
    assert len(vals["ref"]) == 2 and vals[name] == pytest.approx(vals["ref"], rel=TOL), vals  # steps 50, 100


@pytest.mark.parametrize("name,ref", [("pp2dp2_z3_ac", "ref_short"), ("pp2dp2_z3_gpt1", "ref_gpt1"),
                                      ("tp2pp2_z3_sp", "ref_short"), ("pp2dp2_z3_recompute", "ref_short")])
def test_activation_checkpointing_gpt1_and_sequence_parallelism_keep_working(out, name, ref):
    """30 steps of each, the same step for step as one rank (GPT-1: its own reference)."""
    got, want = _steps(out, name), _steps(out, ref)
    assert [r["step"] for r in got] == list(range(1, 31))
    for a, b in zip(got, want, strict=True):
        assert _rel(a["loss"], b["loss"]) <= TOL, (name, a["step"], a["loss"], b["loss"])
        assert _rel(a["grad_norm"], b["grad_norm"]) <= TOL, (name, a["step"], a["grad_norm"], b["grad_norm"])
        assert a["samples_sha"] == b["samples_sha"], (name, a["step"])
    assert max(r["tied_diff"] for r in got) == 0.0


@pytest.mark.parametrize("name", [*LAYOUTS, "pp2dp2_z3_ac", "pp2dp2_z3_gpt1", "tp2pp2_z3_sp", "pp2dp2_z3_recompute"])
def test_tied_embedding_copies_stay_equal(out, name):
    diffs = [r["tied_diff"] for r in _steps(out, name)]
    assert len(diffs) in (30, 100) and max(diffs) == 0.0, max(diffs)


@pytest.mark.parametrize("name", LAYOUTS)
def test_export_gathers_each_stages_weights_by_name(out, name):
    """Export reads a stage-engine checkpoint two ways, bit for bit alike: the layout-free
    files and DeepSpeed's own per-stage files (ZeRO partitions merged, TP shards joined); the
    weights match the one-rank run's."""
    from gpt_dist.export.reader import gather_checkpoint, resolve_checkpoint

    tag, manifest = resolve_checkpoint(out / name)
    free = gather_checkpoint(tag, manifest, source="layout_free")
    native = gather_checkpoint(tag, manifest, source="deepspeed")
    assert sorted(free) == sorted(native)
    for k, v in free.items():
        assert torch.equal(v, native[k][: v.shape[0]]), k  # the DeepSpeed files keep the vocabulary padding
    ref_tag, ref_manifest = resolve_checkpoint(out / "ref")
    ref = gather_checkpoint(ref_tag, ref_manifest, source="layout_free")
    assert sorted(ref) == sorted(free)
    worst = max(float((free[k] - ref[k]).abs().max()) for k in ref)
    assert worst <= WEIGHT_TOL, worst
    # evaluation, generation and prediction read a run directory through the same reader
    from gpt_dist.inference.source import read_source

    src = read_source(out / name)
    assert src.info["kind"] == "run" and src.info["step"] == 100
    assert sorted(src.state) == sorted(free) and all(torch.equal(src.state[k], free[k]) for k in free)


def test_negative_control_unsummed_tied_gradients_drift(out):
    """The same run without the tied-gradient sum: the copies part and the run leaves ref."""
    got, ref = _steps(out, "untied"), _steps(out, "ref")[:10]
    assert max(r["tied_diff"] for r in got) > 1e-4, [r["tied_diff"] for r in got]
    assert max(_rel(a["loss"], b["loss"]) for a, b in zip(got, ref, strict=True)) > 10 * TOL


def test_tp2pp2_runs_zero3_over_a_data_parallel_group_of_one(out):
    """TP x PP x ZeRO-3 at dp=1 (the 4-rank pp2dp2 runs show the 1/dp partitioning)."""
    reports = [r["zero3_partition"] for r in _steps(out, "tp2pp2_z3") if "zero3_partition" in r]
    assert len(reports) == 1 and reports[0]["dp"] == 1 and len(reports[0]["ranks"]) == 4, reports


@pytest.mark.parametrize("name,dp", [("pp2dp2_z3", 2), ("pp2dp2_z3_gpipe", 2), ("untied", 2)])
def test_zero3_partitions_each_stage_over_its_dp_group(out, name, dp):
    """Each rank holds ceil(numel/dp) of every parameter of its stage, none persistent, none
    gathered after the step (the report covers all 4 ranks: both stages)."""
    recs = _steps(out, name)
    assert helpers.assert_zero3_partitioned(recs, dp=dp) == 1
    # the optimizer state too: each rank's Adam moments cover 1/dp of its stage (ZeRO's
    # alignment padding aside), never the whole stage
    held = next(r["adam_held"] for r in recs if "adam_held" in r)
    assert len(held) == 4
    for exp_avg, stage in held:
        assert stage / dp <= exp_avg <= stage / dp + 64, (exp_avg, stage)
    report = next(r["zero3_partition"] for r in recs if "zero3_partition" in r)
    stage0, stage1 = report["ranks"][0], report["ranks"][-1]
    assert any(n.startswith("tied_modules") for n in stage0) and "3.ln_f.weight" in stage1, (sorted(stage0), sorted(stage1))


@pytest.mark.parametrize("name,line", [
    ("z2_to_tp2pp2z3", "written at tp=1 pp=2 dp=2 zero=2 fp32, this run tp=2 pp=2 dp=1 zero=3 fp32"),
    ("z3_to_1", "written at tp=1 pp=2 dp=2 zero=3 fp32, this run tp=1 pp=1 dp=1 zero=0 fp32")])
def test_stage_engine_checkpoints_resume_in_other_layouts(out, name, line):
    """Into and out of the stage engines through the layout-free state: steps 51-100 equal
    the uninterrupted one-rank run's."""
    got, ref = _steps(out, name), _steps(out, "ref")[50:]
    assert [r["step"] for r in got] == list(range(51, 101))
    for a, b in zip(got, ref, strict=True):
        assert _rel(a["loss"], b["loss"]) <= TOL, (name, a["step"], a["loss"], b["loss"])
        assert _rel(a["grad_norm"], b["grad_norm"]) <= TOL, (name, a["step"])
        assert a["lr"] == b["lr"] and a["samples_sha"] == b["samples_sha"], (name, a["step"])
    log = (out / "worker.log").read_text()
    assert f"resume in a new layout: {out / name}/checkpoints/global_step50 {line};" in log


def test_preempted_twice_resumes_exactly(out):
    """A stop signal saves and exits; each start resumes natively: every record of steps 1-11
    equals the uninterrupted run's bit for bit."""
    got = {r["step"]: r for r in _steps(out, "pp2dp2_z3_preempted")}
    ref = {r["step"]: r for r in _steps(out, "pp2dp2_z3")}
    assert sorted(got) == list(range(1, 12))
    for s in got:
        for key in ("loss", "grad_norm", "lr", "samples_sha", "consumed_samples"):
            assert got[s][key] == ref[s][key], (s, key, got[s][key], ref[s][key])
    assert helpers.assert_zero3_partitioned(_steps(out, "pp2dp2_z3_preempted"), dp=2) == 2  # each start


def test_non_finite_loss_on_one_stage_rank_skips_the_update_everywhere(out):
    recs = {r["step"]: r for r in _steps(out, "pp2dp2_z3_nan")}
    ref = {r["step"]: r for r in _steps(out, "pp2dp2_z3")}
    assert sorted(recs) == list(range(1, 9))
    assert [recs[s]["skipped"] for s in range(1, 9)] == [0] * 4 + [1] * 4
    assert recs[5]["state_sha"] == recs[4]["state_sha"]   # weights and Adam state untouched, every rank
    assert recs[6]["state_sha"] != recs[5]["state_sha"]   # and training goes on
    assert not math.isfinite(recs[5]["loss"]) and all(math.isfinite(recs[s]["loss"]) for s in (4, 6, 7, 8))
    assert [recs[s]["lr"] for s in range(1, 9)] == [ref[s]["lr"] for s in range(1, 9)]  # the schedule advances


def test_stage_recompute_replays_dropout_exactly(out):
    """With dropout on (TP regions draw from the model-parallel RNG tracker), recomputing each
    stage's forward before its backward gives the very same run: the recomputed activations
    are the ones sent on."""
    plain, rc = _steps(out, "tp2pp2_drop"), _steps(out, "tp2pp2_drop_recompute")
    assert len(plain) == len(rc) == 10
    for a, b in zip(plain, rc, strict=True):
        assert a["loss"] == b["loss"] and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6), (a, b)
