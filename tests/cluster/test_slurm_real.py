"""slurm/pretrain.sh under a real (one-node, localhost) Slurm: sbatch, srun, requeue.

A module fixture installs slurm-wlm/munge if missing (root), starts munged, slurmctld and
slurmd with a generated config (tests/cluster/_slurm.py) and stops them by process id.

* ``sbatch slurm/pretrain.sh CONFIG`` with 2 tasks trains, both srun tasks are recognised
  as ranks 0/1 (SLURM_PROCID/NTASKS/LOCALID), the checkpoint is committed and the losses
  equal the torchrun reference;
* ``scancel --signal=USR1 --batch JOB`` mid-run: the batch shell forwards it through srun,
  every rank saves at the same step, the script requeues the job, the requeued job (same
  id, Restarts=1) resumes and finishes with the losses of the uninterrupted run;
* resubmitted with another node count (issue 19; on one node: 2 tasks, then 1): the second
  job resumes the same run in the new layout and continues the uninterrupted run's losses.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import _slurm
import pytest
from cluster_helpers import (
    PY,
    ROOT,
    RUNNER,
    STEPS,
    clean_env,
    losses,
    run_logged,
    steps_logged,
    tail,
    torchrun_cmd,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "slurm" / "pretrain.sh"
# the allocation of this machine: one node, 2 tasks, no GPUs, a short time limit
SBATCH_ARGS = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
               "--time=15", "--job-name=gdtest"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = _slurm.ensure_installed()
    if why:
        pytest.skip(why)
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd/munged with SlurmUser=root needs root")
    cluster = _slurm.LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _submit(slurm, tmp_path: Path, cfg: Path, *args: str, sbatch_args: list[str] = SBATCH_ARGS,
            **extra: str) -> tuple[int, Path]:
    wrapper = tmp_path / "python-test"  # PYTHON: the venv's python through the runner
    wrapper.write_text(f'#!/bin/bash\nexec "{PY}" "{RUNNER}" "$@"\n')
    wrapper.chmod(0o755)
    # extra: GPT_DIST_TEST_AWAIT_SIGNAL_AT=5 (preemption test) holds a fresh run before step 5
    # until it is signalled, so the signal lands mid-run however fast the machine is
    env = clean_env(**{"PYTHON": str(wrapper), "SLURM_CONF": slurm.env["SLURM_CONF"], "MAX_RESTARTS": "2", **extra})
    out = tmp_path / "job-%j.out"
    proc = subprocess.run(["sbatch", "--parsable", *sbatch_args, f"--output={out}", str(SCRIPT),
                           str(cfg), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr + slurm.logs()
    job_id = int(proc.stdout.strip().split(";")[0])
    return job_id, tmp_path / f"job-{job_id}.out"


def _wait_done(slurm, job_id: int, out: Path, timeout: float) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = slurm.job(job_id)
        state = job.get("JobState", "")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return job
        # A requeued job waits out its BeginTime (_slurm.CRED_EXPIRE_S + 1 s): Slurm's guard
        # that the new launch credential is newer than the revoked one. Never force
        # StartTime=now: a start in the revocation's second fails the job (see _slurm.py).
        time.sleep(1)
    subprocess.run(["scancel", str(job_id)], env=slurm.env, timeout=30, check=False)
    pytest.fail(f"job {job_id} did not finish in {timeout} s: {slurm.job(job_id)}\n{tail(out)}\n"
                + slurm.logs())


def test_sbatch_two_tasks_trains_and_checkpoints(slurm, tmp_path, reference):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.json", reference["toy"], run_dir)
    job_id, out = _submit(slurm, tmp_path, cfg)
    job = _wait_done(slurm, job_id, out, timeout=300)
    text = out.read_text(errors="replace")
    assert job["JobState"] == "COMPLETED" and job.get("ExitCode") == "0:0", f"{job}\n{tail(out)}"
    assert f"pretrain.sh: job {job_id} restart 0/2" in text
    assert "tasks=2" in text
    for rank in (0, 1):  # srun's tasks became ranks 0 and 1 of one world
        assert f"[launcher] srun rank {rank}/2 local {rank}" in text, tail(out)
    assert "pretrain.sh: srun exited with 0" in text
    assert losses(run_dir) == reference["losses"]
    tag = run_dir / "checkpoints" / f"global_step{STEPS}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == tag.name
    assert (tag / "manifest.json").is_file()
    assert sorted(p.name for p in tag.glob("rng_rank_*.pt")) == ["rng_rank_00000.pt", "rng_rank_00001.pt"]
    assert (run_dir / "config.json").is_file() and (run_dir / "metrics.jsonl").is_file()


def test_usr1_preemption_requeues_and_resumes_exactly(slurm, tmp_path, reference):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.json", reference["toy"], run_dir)
    job_id, out = _submit(slurm, tmp_path, cfg, GPT_DIST_TEST_AWAIT_SIGNAL_AT="5")
    wait_for(lambda: steps_logged(run_dir) >= 2 or slurm.job(job_id).get("JobState") not in
             ("PENDING", "RUNNING", "CONFIGURING"), 240, "step 2 of the job")
    assert slurm.job(job_id).get("JobState") == "RUNNING", tail(out)
    # what --signal=B:USR1@120 does at the time limit, now
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job_id)], env=slurm.env,
                   check=True, timeout=30)
    job = _wait_done(slurm, job_id, out, timeout=400)
    text = out.read_text(errors="replace")  # --open-mode=append: both runs of the job
    assert job["JobState"] == "COMPLETED" and job.get("ExitCode") == "0:0", f"{job}\n{tail(out)}"
    assert job.get("Restarts") == "1", job
    assert "pretrain.sh: SIGUSR1" in text and f"pretrain.sh: requeueing job {job_id}" in text, tail(out)
    assert f"pretrain.sh: job {job_id} restart 1/2" in text, tail(out)
    stopped = [line for line in text.splitlines() if line.startswith("signal received: saving at step")]
    assert len(stopped) == 1, tail(out)
    k = int(stopped[0].split("step")[1].split()[0])
    assert 2 <= k < STEPS, f"stopped at step {k}"
    tag = run_dir / "checkpoints" / f"global_step{k}"
    assert f"resumed from {tag} (step {k}," in text, tail(out)
    assert sorted(p.name for p in tag.glob("rng_rank_*.pt")) == ["rng_rank_00000.pt", "rng_rank_00001.pt"]
    assert losses(run_dir) == reference["losses"]  # the resumed run is bit-exact


def test_sbatch_the_shipped_tiny_cpu_config(slurm, tmp_path):
    """The documented command itself, ``sbatch slurm/pretrain.sh configs/tiny_cpu.json``, with
    a sentencepiece tokenizer of 512 pieces and shards built here, shortened
    with ``--set`` arguments that the script passes through to launch/pretrain.py."""
    from tests.toy_data import build_tiny_corpus_and_shards

    prefix, tok = build_tiny_corpus_and_shards(tmp_path / "data", n_docs=120, vocab_size=512,
                                              shard_tokens=10**9)
    run_dir = tmp_path / "run"
    sets = [f"data.prefixes=[\"{prefix}\"]", f"data.tokenizer={tok}", f"run.dir={run_dir}",
            "data.split=90,10,0", "training.train_steps=6", "training.eval_interval=3", "checkpoint.save_interval=3"]
    job_id, out = _submit(slurm, tmp_path, ROOT / "configs" / "tiny_cpu.json", "--set", *sets)
    job = _wait_done(slurm, job_id, out, timeout=300)
    assert job["JobState"] == "COMPLETED" and job.get("ExitCode") == "0:0", f"{job}\n{tail(out)}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "global_step6", tail(out)
    saved = __import__("json").loads((run_dir / "config.json").read_text())
    assert saved["model"]["n_layer"] == 4 and saved["training"]["train_steps"] == 6  # tiny_cpu + --set
    assert steps_logged(run_dir) == 6


def _resize_config(path: Path, toy: dict[str, str], run_dir: Path) -> Path:
    """The launcher runs' toy config with dropout 0 and lr 1e-3 (ZeRO-1 as configs/tiny_cpu.json):
    in another layout the RNG streams are new and only rounding may differ, which a smooth run
    keeps at ~1e-7 (docs/cluster.md, "Resubmitting with another node count")."""
    import json

    write_config(path, toy, run_dir)
    cfg = json.loads(path.read_text())
    cfg["model"].update(dropout=0.0, attn_dropout=0.0)
    cfg["optimizer"]["lr"] = 1e-3
    assert cfg["deepspeed"]["zero_optimization"]["stage"] == 1
    path.write_text(json.dumps(cfg, indent=1))
    return path


def test_resubmitted_with_another_task_count_resumes_the_same_run(slurm, tmp_path, toy):
    """``sbatch`` with 2 tasks, stopped after step 4 as at the time limit with no requeue left;
    the same ``sbatch slurm/pretrain.sh`` (same RUN_NAME, same run directory) resubmitted with
    1 task resumes in the new layout (dp=1, 2 micro-batches per step instead of 1) and
    continues the uninterrupted 2-task run: same consumed samples, lr and batches, losses to
    1e-5 relative."""
    from gpt_dist.training.metrics import read_metrics

    ref_run = tmp_path / "reference"
    ref_cfg = _resize_config(tmp_path / "ref.json", toy, ref_run)
    proc = run_logged(torchrun_cmd(ref_cfg), tmp_path / "torchrun.log", timeout=240, env=clean_env(), cwd=ROOT)
    assert proc.returncode == 0, tail(tmp_path / "torchrun.log")
    want, _ = read_metrics(ref_run)
    assert sorted(want) == list(range(1, STEPS + 1))

    run_dir = tmp_path / "run"
    cfg = _resize_config(tmp_path / "cfg.json", toy, run_dir)
    name = {"RUN_NAME": "resize"}
    job_a, out_a = _submit(slurm, tmp_path, cfg, GPT_DIST_TEST_AWAIT_SIGNAL_AT="5", MAX_RESTARTS="0", **name)
    wait_for(lambda: steps_logged(run_dir) >= 4 or slurm.job(job_a).get("JobState") not in
             ("PENDING", "RUNNING", "CONFIGURING"), 240, "step 4 of the first job")
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job_a)], env=slurm.env, check=True, timeout=30)
    job = _wait_done(slurm, job_a, out_a, timeout=300)
    text_a = out_a.read_text(errors="replace")
    assert job["JobState"] == "COMPLETED" and job.get("Restarts") == "0", f"{job}\n{tail(out_a)}"
    assert "tasks=2" in text_a and "MAX_RESTARTS=0 reached; not requeueing" in text_a, tail(out_a)
    assert "signal received: saving at step 4 and exiting" in text_a, tail(out_a)
    tag = run_dir / "checkpoints" / "global_step4"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == tag.name

    one_task = [a.replace("--ntasks-per-node=2", "--ntasks-per-node=1") for a in SBATCH_ARGS]
    job_b, out_b = _submit(slurm, tmp_path, cfg, sbatch_args=one_task, **name)
    job = _wait_done(slurm, job_b, out_b, timeout=300)
    text_b = out_b.read_text(errors="replace")
    assert job["JobState"] == "COMPLETED" and job.get("ExitCode") == "0:0", f"{job}\n{tail(out_b)}"
    # one srun task is a world of one (gpt_dist.parallel.discover_launch_env: a plain process)
    assert "tasks=1" in text_b and "[launcher] python rank 0/1 local 0" in text_b, tail(out_b)
    # the one console line: both layouts and what carried over
    moved = [line for line in text_b.splitlines() if line.startswith("resume in a new layout:")]
    assert len(moved) == 1, tail(out_b)
    assert (f"{tag} written at tp=1 pp=1 dp=2 zero=1 fp32, this run tp=1 pp=1 dp=1 zero=1 fp32;" in moved[0]
            and "step 4, 32 samples consumed" in moved[0]), moved[0]
    assert f"resumed from {tag} (step 4, 32 samples consumed)" in text_b, tail(out_b)

    got, _ = read_metrics(run_dir)  # steps 1-4 of the first job, 5-12 of the second
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    for step in range(1, 5):  # the first job: bit-exact with torchrun in the same layout
        assert got[step]["loss"] == want[step]["loss"], step
    worst = 0.0
    for step in range(5, STEPS + 1):
        g, w = got[step], want[step]
        assert g["consumed_samples"] == w["consumed_samples"] == 8 * step, (step, g, w)
        assert g["samples_sha"] == w["samples_sha"] and g["lr"] == pytest.approx(w["lr"], rel=1e-12), (step, g, w)
        worst = max(worst, abs(g["loss"] - w["loss"]) / abs(w["loss"]))
    print(f"\nresubmitted 2 -> 1 task: max relative loss difference over steps 5-{STEPS}: {worst:.2e}")
    assert worst <= 1e-5, worst
