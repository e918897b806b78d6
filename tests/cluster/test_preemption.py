"""RELIABILITY.md T15, live: slurm/pretrain.sh under bash with a shim ``srun``.

The shim starts SLURM_NTASKS copies of the command with SLURM_PROCID/SLURM_LOCALID set and
forwards USR1/TERM to them, as srun does. At a step in the middle of the run the test sends
SIGUSR1 to the batch shell (how ``--signal=B:USR1@120`` is delivered). Then:

* every rank saves at the same step (the all-reduced flag): the preemption checkpoint has
  both ranks' shards and RNG files, is committed, and the log says where it stopped;
* the job exits 0 within 60 s of the signal and asks for a requeue;
* the "requeued" job (same job id, SLURM_RESTART_COUNT=1) resumes at that step + 1 and the
  losses of steps 1..N equal the uninterrupted reference bit for bit.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from cluster_helpers import (
    PY,
    ROOT,
    RUNNER,
    STEPS,
    clean_env,
    free_port,
    losses,
    steps_logged,
    tail,
    wait_for,
    write_config,
)

from tests import helpers

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "slurm" / "pretrain.sh"

SHIM_SRUN = r"""#!/bin/bash
# srun stand-in: SLURM_NTASKS tasks of "$@" on this host, signals forwarded to all of them.
while [ "$#" -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done   # srun's own options
pids=()
for ((i = 0; i < ${SLURM_NTASKS:-1}; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_ID=0 SLURM_STEP_NUM_TASKS=${SLURM_NTASKS:-1} "$@" &
  pids+=($!)
done
trap 'echo USR1 >> "$SHIM_LOG"; kill -USR1 "${pids[@]}" 2>/dev/null' USR1
trap 'echo TERM >> "$SHIM_LOG"; kill -TERM "${pids[@]}" 2>/dev/null' TERM
rc=0
for p in "${pids[@]}"; do
  while :; do wait "$p"; r=$?; kill -0 "$p" 2>/dev/null || break; done
  [ "$r" -ne 0 ] && rc=$r
done
exit "$rc"
"""

SHIM_SCONTROL = r"""#!/bin/bash
echo "$*" >> "$SHIM_LOG"
if [ "$1" = show ] && [ "$2" = hostnames ]; then echo localhost; fi
"""


def _job_env(tmp_path: Path, restart: int, job_id: int) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        for name, text in (("srun", SHIM_SRUN), ("scontrol", SHIM_SCONTROL)):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        wrapper = bin_dir / "python-test"  # PYTHON: the real entry point through the runner
        wrapper.write_text(f'#!/bin/bash\nexec "{PY}" "{RUNNER}" "$@"\n')
        wrapper.chmod(0o755)
    env = clean_env(SLURM_JOB_ID=str(job_id), SLURM_JOB_NAME="t15", SLURM_JOB_NODELIST="localhost",
                    SLURM_NNODES="1", SLURM_NTASKS="2", SLURM_SUBMIT_DIR=str(ROOT),
                    SLURM_RESTART_COUNT=str(restart), SHIM_LOG=str(tmp_path / "shim.log"),
                    PYTHON=str(bin_dir / "python-test"), MAX_RESTARTS="3",
                    GPT_DIST_TEST_AWAIT_SIGNAL_AT="5")  # a fresh run holds before step 5
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def test_usr1_saves_on_every_rank_exits_requeues_and_resumes_bit_exact(tmp_path, reference):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.json", reference["toy"], run_dir)
    log1 = tmp_path / "job-1.out"
    port = free_port()  # pretrain.sh's rendezvous port is 20000 + job id % 20000
    job_id = port - 20000 if port > 20000 else port + 20000

    # 1) first allocation: signal once a few steps are logged
    with helpers.Job(["bash", SCRIPT, cfg], env=_job_env(tmp_path, 0, job_id), log=log1) as job:
        wait_for(lambda: steps_logged(run_dir) >= 2 or job.poll() is not None, 240,
                 "step 2 of the first allocation")
        assert job.poll() is None, tail(log1)
        job.send_signal(signal.SIGUSR1)  # the batch shell, as --signal=B:USR1@120 does
        t_sig = time.time()
        rc = job.wait(timeout=90).rc
        exit_s = time.time() - t_sig
    text = log1.read_text(errors="replace")
    assert rc == 0, tail(log1)
    assert exit_s < 60, f"job took {exit_s:.0f} s to exit after SIGUSR1"
    stopped = [line for line in text.splitlines() if line.startswith("signal received: saving at step")]
    assert len(stopped) == 1, tail(log1)
    k = int(stopped[0].split("step")[1].split()[0])
    assert 2 <= k < STEPS, f"stopped at step {k}: the signal should land mid-run"
    assert f"checkpoint saved: {run_dir / 'checkpoints' / f'global_step{k}'} at step {k}" in text
    # every rank wrote its shards of the same step (a rank saving elsewhere would deadlock or
    # leave the tag without its files; the manifest is written only after all ranks agreed)
    tag = run_dir / "checkpoints" / f"global_step{k}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"global_step{k}"
    assert (tag / "manifest.json").is_file()
    assert sorted(p.name for p in tag.glob("rng_rank_*.pt")) == ["rng_rank_00000.pt", "rng_rank_00001.pt"]
    assert sorted(p.name for p in tag.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert max(losses(run_dir)) == k  # no step after the agreed one
    shim = (tmp_path / "shim.log").read_text()
    assert "USR1" in shim and "requeue" in shim, shim  # forwarded to the tasks; requeued
    assert f"pretrain.sh: requeueing job {job_id}" in text

    # 2) the requeued job: same run, restart count 1, no signal
    log2 = tmp_path / "job-2.out"
    proc = helpers.run(["bash", SCRIPT, cfg], env=_job_env(tmp_path, 1, job_id), log=log2, timeout=300)
    text2 = log2.read_text(errors="replace")
    assert proc.returncode == 0, tail(log2)
    assert f"pretrain.sh: job {job_id} restart 1/3" in text2, tail(log2)
    assert f"resumed from {tag} (step {k}," in text2, tail(log2)
    first = next(line for line in text2.splitlines() if line.startswith("step "))
    assert first.split()[1] == f"{k + 1}/{STEPS}", first  # resumes at the saved step + 1
    assert losses(run_dir) == reference["losses"]  # bit-exact with the uninterrupted run
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"global_step{STEPS}"
