"""Pipeline parallelism on CPU/gloo with the real trainer (DeepSpeed PipelineEngine, 1F1B).

Three launches, shared by the tests below (the toy model: 2 blocks, one per stage):

* ``pp1``: 1 process, 10 steps, dropout off: the reference.
* ``pp2``: 2 processes (pp=2), the same config; SIGKILLed at the start of step 8
  (GPT_DIST_TEST_KILL_AT) and restarted by torchrun (--max-restarts=1): it resumes from the
  step-4 checkpoint, so steps 5-7 run twice, before and after the restart. Every rank holding
  the tied embedding dumps it after every step (tests/pipeline/run.py).
* ``tp2pp2``: 4 processes, tp=2 x pp=2 with sequence parallelism and activation
  checkpointing (the pp1 LR schedule, 5 steps); killed at step 4 and resumed from the step-2
  checkpoint. Dropout stays off so its losses can be held against pp1 (dropout with
  checkpointing and SP: test_sequence_parallel_and_checkpointing.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, launch, metrics, overrides

from gpt_dist.config import ConfigError, load_config, validate
from tests import helpers

TOL = 1e-5


# --------------------------------------------------------------------------- fast checks


@pytest.mark.parametrize("stage", [2, 3])
def test_pp_with_zero23_runs_on_stage_engines_and_deepspeeds_engine_refuses(stage, base_json):
    """pp > 1 under ZeRO-2/3 validates (``auto``: one DeepSpeed engine per stage, issue 20);
    asking for DeepSpeed's pipeline engine, which refuses ZeRO-2/3, is one line naming the key."""
    cfg = load_config(base_json, ["parallel.pp=2", f"deepspeed.zero_optimization.stage={stage}"])
    validate(cfg, 2, check_paths=False)
    assert cfg.staged_pipeline
    cfg = load_config(base_json, ["parallel.pp=2", f"deepspeed.zero_optimization.stage={stage}",
                                  "parallel.pipeline_engine=deepspeed"])
    with pytest.raises(ConfigError) as exc:
        validate(cfg, 2, check_paths=False)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("parallel.pipeline_engine:") and f"ZeRO-{stage}" in msg and "'stages'" in msg, msg


@pytest.mark.parametrize("sets,key", [
    (["deepspeed.zero_optimization.stage=0", "parallel.pipeline_engine=stages"], "parallel.pipeline_engine:"),
    (["deepspeed.zero_optimization.stage=3", "training.precision=fp16"], "training.precision:"),
    (["deepspeed.zero_optimization.stage=3", "deepspeed.zero_optimization.offload_optimizer.device=cpu"],
     "deepspeed.zero_optimization.offload_optimizer:"),
    (["deepspeed.zero_optimization.stage=1", "parallel.pipeline_schedule=gpipe"], "parallel.pipeline_schedule:"),
    (["deepspeed.zero_optimization.stage=1", "parallel.stage_recompute=true"], "parallel.stage_recompute:"),
])
def test_stage_engine_constraints_one_line_each(sets, key, base_json):
    cfg = load_config(base_json, ["parallel.pp=2", *sets])
    with pytest.raises(ConfigError) as exc:
        validate(cfg, 2, check_paths=False)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(key), str(exc.value)


def test_pp_with_zero23_launcher_prints_one_line(tmp_path, base_json):
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(ROOT)}  # exactly this environment: no launcher ever ran
    proc = helpers.run(helpers.python_cmd(ROOT / "launch" / "pretrain.py", "--config", base_json,
                                          "--set", "parallel.pp=2", "deepspeed.zero_optimization.stage=3",
                                          "parallel.pipeline_engine=deepspeed",
                                          f"run.dir={tmp_path}"), env=env, timeout=120)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("pretrain:")]
    assert len(errors) == 1 and "parallel.pipeline_engine" in errors[0], proc.stderr[-2000:]


def test_validation_layers_and_micro_batches(base_json):
    cfg = load_config(base_json, ["parallel.pp=2", "model.n_layer=3"])
    with pytest.raises(ConfigError, match="n_layer=3 is not divisible by pp=2"):
        validate(cfg, 2, check_paths=False)
    cfg = load_config(base_json, ["parallel.pp=2", "training.global_batch_size=2"])
    with pytest.raises(ConfigError, match="1 micro-batches per step < pp=2"):
        validate(cfg, 2, check_paths=False)


# --------------------------------------------------------------------------- launches


@pytest.fixture(scope="module")
def pp1(toy_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("pp1")
    launch(1, overrides(toy_data, run, **{"checkpoint.save_interval": 4}), log_to=run / "launch.log")
    return run


@pytest.fixture(scope="module")
def pp2(toy_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("pp2")
    tied = run / "tied"
    tied.mkdir()
    proc = launch(2, overrides(toy_data, run, **{"parallel.pp": 2, "checkpoint.save_interval": 4}),
                  env={"GPT_DIST_TEST_KILL_AT": "8", "GPT_DIST_TEST_TIED_DIR": str(tied)},
                  max_restarts=1, log_to=run / "launch.log")
    return run, proc


@pytest.fixture(scope="module")
def tp2pp2(toy_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("tp2pp2")
    tied = run / "tied"
    tied.mkdir()
    proc = launch(4, overrides(toy_data, run, **{
        "parallel.pp": 2, "parallel.tp": 2, "parallel.sequence_parallel": True,
        "parallel.activation_checkpointing": "full", "schedule.decay_steps": 10,
        "training.train_steps": 5, "training.eval_interval": 5, "checkpoint.save_interval": 2}),
        env={"GPT_DIST_TEST_KILL_AT": "4", "GPT_DIST_TEST_TIED_DIR": str(tied)},
        max_restarts=1, timeout=600, log_to=run / "launch.log")
    return run, proc


def _lines(run):
    import json

    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def _tied_equal(tied_dir, steps, pairs):
    for step in steps:
        for a, b in pairs:
            wa = torch.load(tied_dir / f"tied_rank{a}_step{step}.pt")
            wb = torch.load(tied_dir / f"tied_rank{b}_step{step}.pt")
            assert torch.equal(wa, wb), f"step {step}: tied embedding differs on ranks {a} and {b}"


@pytest.mark.slow
def test_pp2_loss_equals_pp1(pp1, pp2):
    ref_train, ref_val = metrics(pp1)
    train, val = metrics(pp2[0])
    assert sorted(train) == list(range(1, 11)) == sorted(ref_train)
    for step in ref_train:
        assert abs(train[step] - ref_train[step]) <= TOL, (step, train[step], ref_train[step])
    assert abs(val[10] - ref_val[10]) <= TOL
    assert ref_train[10] < ref_train[1]  # it learns: the weights really move
    out = (pp2[0] / "launch.log").read_text()
    assert "pipeline bubble 20.0%" in out  # (pp - 1) / (micro-batches + pp - 1) = 1/5


@pytest.mark.slow
def test_pp2_tied_embedding_equal_on_both_stages_after_every_step(pp2):
    run, _ = pp2
    _tied_equal(run / "tied", range(1, 11), [(0, 1)])
    w1, w10 = (torch.load(run / "tied" / f"tied_rank0_step{s}.pt") for s in (1, 10))
    assert not torch.equal(w1, w10)


@pytest.mark.slow
def test_pp2_resume_is_exact(pp2):
    run, _ = pp2
    seen: dict[int, list[float]] = {}
    for rec in _lines(run):
        if "loss" in rec:
            seen.setdefault(rec["step"], []).append(rec["loss"])
    # steps 5-7 ran before the kill and again after resuming from the step-4 checkpoint
    assert [len(seen[s]) for s in range(1, 11)] == [1, 1, 1, 1, 2, 2, 2, 1, 1, 1], seen
    for s in (5, 6, 7):
        assert seen[s][0] == seen[s][1], (s, seen[s])
    assert "resumed from" in (run / "launch.log").read_text()


@pytest.mark.slow
def test_pp_checkpoints_read_by_export(pp1, pp2, tp2pp2):
    """gpt_dist.export merges the pp=2 (and tp=2 x pp=2) checkpoints' DeepSpeed files into GPT
    names; the pp=2 one holds the weights pp=1 trained. Their layout-free files hold the same
    weights, bit for bit (the real vocabulary rows: the padding is not state)."""
    from gpt_dist.export import gather_checkpoint, resolve_checkpoint

    flat = gather_checkpoint(*resolve_checkpoint(pp1), source="deepspeed")
    piped = gather_checkpoint(*resolve_checkpoint(pp2[0]), source="deepspeed")
    assert flat and set(piped) == set(flat), set(piped) ^ set(flat)
    for k in flat:
        assert torch.allclose(piped[k], flat[k], atol=TOL), k
    grid = gather_checkpoint(*resolve_checkpoint(tp2pp2[0]), source="deepspeed")
    assert {k: v.shape for k, v in grid.items()} == {k: v.shape for k, v in flat.items()}
    for run, native in ((pp1, flat), (pp2[0], piped), (tp2pp2[0], grid)):
        free = gather_checkpoint(*resolve_checkpoint(run), source="layout_free")
        assert set(free) == set(native), set(free) ^ set(native)
        for k, t in free.items():
            assert torch.equal(t, native[k][: t.shape[0]]), (run, k)


@pytest.mark.slow
def test_tp2_pp2_sequence_parallel_checkpointing_equals_pp1_and_resumes(pp1, tp2pp2):
    run, _ = tp2pp2
    ref_train, _ = metrics(pp1)
    seen: dict[int, list[float]] = {}
    for rec in _lines(run):
        if "loss" in rec:
            seen.setdefault(rec["step"], []).append(rec["loss"])
    assert sorted(seen) == [1, 2, 3, 4, 5] and len(seen[3]) == 2, seen
    assert seen[3][0] == seen[3][1]  # resumed: bitwise the same step
    for step, losses in seen.items():
        assert abs(losses[-1] - ref_train[step]) <= TOL, (step, losses, ref_train[step])
    # grid tp=2, dp=1, pp=2: ranks 0,1 = stage 0 (tp 0,1); ranks 2,3 = stage 1
    _tied_equal(run / "tied", range(1, 6), [(0, 2), (1, 3)])


# --------------------------------------------------------------------------- fused kernels at any pp

KERNELS_ON = {"kernels.layernorm": "on", "kernels.bias_gelu": "on", "kernels.bias_dropout_add": "on",
              "kernels.cross_entropy": "on", "kernels.ce_chunk_tokens": 7,
              "training.train_steps": 3, "schedule.decay_steps": 10, "training.eval_interval": 3}


def _kernel_run(toy_data, run, pp: int) -> dict[str, int]:
    """A 3-step run with every Triton kernel on (Triton's interpreter on CPU); the kernels'
    calls summed over the ranks (tests/pipeline/kernel_probe.py)."""
    import json

    counts = run / "kernels"
    env = {"GPT_DIST_TEST_KERNEL_COUNTS": str(counts)}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    launch(pp, overrides(toy_data, run, **{**KERNELS_ON, "parallel.pp": pp}), env=env, timeout=600,
           log_to=run / "launch.log")
    total: dict[str, int] = {}
    for rank in range(pp):
        for k, v in json.loads((run / f"kernels.rank{rank}.json").read_text()).items():
            total[k] = total.get(k, 0) + v
    return total


@pytest.mark.slow
def test_fused_kernels_mean_the_same_at_pp1_and_pp2(pp1, toy_data, tmp_path):
    """Every kernel switch runs the same kernels at pp=1 and pp=2 (the last stage's head is the
    model's LMHead: the fused LayerNorm for ln_f, the cross-entropy fused with the output layer,
    not a different CE kernel), and the losses equal each other and the unfused pp=1 run."""
    c1 = _kernel_run(toy_data, tmp_path / "k1", 1)
    c2 = _kernel_run(toy_data, tmp_path / "k2", 2)
    assert c1 == c2, (c1, c2)
    # every switch really ran: LN (2 per block + ln_f), bias+GELU, bias+dropout+add, fused CE
    assert all(c1.get(k, 0) > 0 for k in ("layer_norm", "bias_gelu", "bias_dropout_add",
                                           "fused_linear_cross_entropy")), c1
    assert c1.get("vocab_parallel_cross_entropy", 0) == 0, c1
    assert c1["layer_norm"] == c1["bias_gelu"] * (2 * 2 + 1) // 2, c1  # 2 blocks: 4 block LNs + ln_f per pass
    ref, _ = metrics(pp1)
    l1, _ = metrics(tmp_path / "k1")
    l2, _ = metrics(tmp_path / "k2")
    assert sorted(l1) == sorted(l2) == [1, 2, 3]
    for step in (1, 2, 3):
        assert abs(l2[step] - l1[step]) <= TOL * max(1.0, l1[step]), (step, l1[step], l2[step])
        assert abs(l1[step] - ref[step]) <= TOL * max(1.0, ref[step]), (step, l1[step], ref[step])
