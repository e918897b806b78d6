"""slurm/pretrain.sh under a real (one-node, localhost) Slurm: sbatch, srun, requeue.

A module fixture installs slurm-wlm/munge if missing (root), starts munged, slurmctld and
slurmd with a generated config (tests/cluster/_slurm.py) and stops them by process id.

* ``sbatch slurm/pretrain.sh CONFIG`` with 2 tasks trains, both srun tasks are recognised
  as ranks 0/1 (SLURM_PROCID/NTASKS/LOCALID), the checkpoint is committed and the losses
  equal the torchrun reference;
* ``scancel --signal=USR1 --batch JOB`` mid-run: the batch shell forwards it through srun,
  every rank saves at the same step, the script requeues the job, the requeued job (same
  id, Restarts=1) resumes and finishes with the losses of the uninterrupted run.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import _slurm
import pytest
from cluster_helpers import PY, ROOT, RUNNER, STEPS, clean_env, losses, steps_logged, tail, wait_for, write_config

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


def _submit(slurm, tmp_path: Path, cfg: Path, *args: str, **extra: str) -> tuple[int, Path]:
    wrapper = tmp_path / "python-test"  # PYTHON: the venv's python through the runner
    wrapper.write_text(f'#!/bin/bash\nexec "{PY}" "{RUNNER}" "$@"\n')
    wrapper.chmod(0o755)
    # extra: GPT_DIST_TEST_AWAIT_SIGNAL_AT=5 (preemption test) holds a fresh run before step 5
    # until it is signalled, so the signal lands mid-run however fast the machine is
    env = clean_env(PYTHON=str(wrapper), SLURM_CONF=slurm.env["SLURM_CONF"], MAX_RESTARTS="2", **extra)
    out = tmp_path / "job-%j.out"
    proc = subprocess.run(["sbatch", "--parsable", *SBATCH_ARGS, f"--output={out}", str(SCRIPT),
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
