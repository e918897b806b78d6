"""A run directory is evaluated as its export; every checkpoint of a run (the sweep's plot);
the overlap report finds the test rows planted in the training shard and no others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.eval.conftest import OVERLAP_PLANTED
from tests.eval.test_builtin import _assert_same, _main, evaluate

pytestmark = pytest.mark.slow


def test_run_dir_equals_its_export(run_dir, trained, ctx, tmp_path) -> None:
    from gpt_dist.export import export_checkpoint

    direct = evaluate(run_dir.dir, trained.data, ctx)
    assert direct["model"]["kind"] == "run" and direct["model"]["step"] == 4
    export = export_checkpoint(run_dir.dir, tmp_path / "exported")
    exported = evaluate(export, trained.data, ctx)
    assert exported["model"]["fingerprint"] == direct["model"]["fingerprint"]
    _assert_same(direct, exported)
    # and the run moved away from its initial weights
    assert direct["model"]["fingerprint"] != evaluate(trained.native, trained.data, ctx)["model"]["fingerprint"]


def test_all_checkpoints_sweep(run_dir, trained, ctx, tmp_path) -> None:
    out, sweep_dir = tmp_path / "sweep.json", tmp_path / "sweep"
    rc, err = _main("--model", str(run_dir.dir), "--all-checkpoints", "--tasks", "lambada,hellaswag",
                    "--data-dir", str(trained.data), "--out", str(out), "--sweep-dir", str(sweep_dir),
                    "--bootstrap-iters", "100")
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert [r["model"]["step"] for r in res["sweep"]] == [2, 4]
    assert Path(res["outputs"]["plot"]).stat().st_size > 1000
    events = list((sweep_dir / "tb").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/lambada/acc")] == [2, 4]


def test_overlap_finds_planted_examples(run_dir, trained, ctx, tmp_path) -> None:
    out = tmp_path / "ov.json"
    argv = ["--model", str(trained.native), "--tasks", f"lambada:{run_dir.overlap_task},hellaswag",
            "--data-dir", str(trained.data), "--overlap-with", str(run_dir.shard),
            "--overlap-cache", str(tmp_path / "cache"),
            "--out", str(out), "--bootstrap-iters", "100",
            "--overlap-n", "24"]  # ~5 words of this 320-piece tokenizer (8 of its tokens are ~2 words)
    rc, err = _main(*argv)
    assert rc == 0, err
    res = json.loads(out.read_text())
    ov = res["tasks"]["overlap"]["overlap"]
    assert ov["overlapping_lines"] == [i + 1 for i in OVERLAP_PLANTED]   # 1-based lines of the file
    assert ov["clean"] == 12 - len(OVERLAP_PLANTED) and ov["share"] == pytest.approx(5 / 12)
    f = ov["filter"]
    assert f["items"] > 0 and f["fp_rate"] <= f["fp_rate_target"] and not f["cached"]
    assert res["tasks"]["overlap"]["metrics_clean"]["acc"]["value"] is not None
    # the multiple-choice contexts follow the corpus's word pattern: most are "seen"
    assert res["tasks"]["hellaswag"]["overlap"]["share"] > 0.5
    rc, err = _main(*argv)
    assert rc == 0 and json.loads(out.read_text())["tasks"]["overlap"]["overlap"]["filter"]["cached"], err


def _assert_eval_tasks_equal_checkpoint(run: Path, step: int, trained, ctx) -> None:
    """The zero-shot metrics a run logged at ``step`` equal its step-``step`` checkpoint's,
    evaluated afterwards in this process (the checkpoint is saved after the evaluation)."""
    from tests import helpers

    recs = [r for r in helpers.metrics_records(run) if "val_metrics" in r]
    assert [r["step"] for r in recs] == [step]
    val = recs[0]["val_metrics"]
    assert recs[0]["val_loss"] == val["loss"] is not None
    res = evaluate(run, trained.data, ctx, "--limit", "10", tasks="lambada,hellaswag")
    assert res["model"]["step"] == step
    for task, m in (("lambada", "acc"), ("lambada", "perplexity"), ("hellaswag", "acc"), ("hellaswag", "acc_norm")):
        assert val[f"{task}/{m}"] == pytest.approx(res["tasks"][task]["metrics"][m]["value"], rel=1e-5), (task, m)


def test_eval_tasks_during_pretraining_equal_the_checkpoint(run_dir, trained, ctx) -> None:
    _assert_eval_tasks_equal_checkpoint(run_dir.dir, 4, trained, ctx)


def test_eval_tasks_during_a_zero3_run_equal_the_checkpoint(zero3_run, trained, ctx) -> None:
    """ZeRO-3 over two data-parallel ranks, every parameter partitioned (``helpers.zero3``):
    the tasks run on the partitioned training model, each layer gathered as it runs, the two
    ranks in lockstep (their shards of the work padded to equal passes)."""
    manifest = json.loads((zero3_run / "checkpoints" / "global_step2" / "manifest.json").read_text())
    zero = manifest["config"]["deepspeed"]["zero_optimization"]
    assert manifest["layout"]["dp"] == 2 and zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 0
    _assert_eval_tasks_equal_checkpoint(zero3_run, 2, trained, ctx)


def test_bad_eval_task_file_is_a_config_error(trained, ctx, tmp_path) -> None:
    from gpt_dist.config import Config, ConfigError, DataConfig, TrainingConfig
    from gpt_dist.eval.training import ZeroShot

    (tmp_path / "hellaswag.jsonl").write_text('{"context": "a", "choices": ["x", "y"], "label": 0}\n{oops\n')
    cfg = Config(data=DataConfig(tokenizer=str(trained.tok_dir)),
                 training=TrainingConfig(eval_tasks=["hellaswag"], eval_tasks_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"training.eval_tasks: .*hellaswag.jsonl:2: invalid JSON"):
        ZeroShot(cfg.model, cfg.data, cfg.training, cfg.zero_stage, ctx)


def test_cli_pipeline_on_a_zero3_run_equals_tp1(zero3_run, trained, ctx, tmp_path) -> None:
    """``torchrun --nproc-per-node 2 launch/evaluate.py --model RUN --pp 2``: the CLI reads a
    ZeRO-3 checkpoint (partitioned over two ranks) directly into a two-stage pipeline; its
    results file has the numbers of the same run evaluated at TP=1 in this process."""
    from tests import helpers

    manifest = json.loads((zero3_run / "checkpoints" / "global_step2" / "manifest.json").read_text())
    assert manifest["layout"]["dp"] == 2 and manifest["config"]["deepspeed"]["zero_optimization"]["stage"] == 3
    out = tmp_path / "pp2.json"
    cmd = helpers.torchrun_cmd(helpers.ROOT / "launch" / "evaluate.py", "--model", zero3_run, "--pp", "2",
                               "--tasks", "lambada,wikitext,hellaswag", "--data-dir", trained.data, "--out", out,
                               "--per-example", "--no-progress", "--bootstrap-iters", "1000", nproc=2)
    res = helpers.run(cmd, env=helpers.child_env(GPT_DIST_PG_TIMEOUT="120"), timeout=300, log=tmp_path / "pp2.log")
    assert res.rc == 0, res.describe()
    assert "| lambada" in res.stdout   # the Markdown table, printed once (rank 0)
    assert res.stdout.count("results: ") == 1
    got = json.loads(out.read_text())
    assert (got["settings"]["tp"], got["settings"]["pp"]) == (1, 2)
    assert got["model"]["kind"] == "run" and got["model"]["step"] == 2
    want = evaluate(zero3_run, trained.data, ctx)
    assert got["model"]["fingerprint"] == want["model"]["fingerprint"]
    assert got["model"]["fingerprint"] != evaluate(trained.native, trained.data, ctx)["model"]["fingerprint"]
    _assert_same(want, got)
