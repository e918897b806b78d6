"""slurm/pretrain.sh under plain bash with fake `srun` and `scontrol` on PATH.

The fakes record their argv (NUL-separated) and environment; `srun` can exit at once with
a given status, wait for a signal (to test USR1/TERM forwarding), or exec the python
command it was given (to check the command line is one pretrain.py accepts).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "slurm" / "pretrain.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

FAKE_SRUN = r"""#!/bin/bash
printf '%s\0' "$@" > "$FAKE_LOG/srun.argv"
env -0 > "$FAKE_LOG/srun.env"
case "${FAKE_SRUN_MODE:-exit}" in
  exit) exit "${FAKE_SRUN_RC:-0}" ;;
  wait)
    trap 'echo USR1 >> "$FAKE_LOG/srun.signals"; exit "${FAKE_SRUN_RC:-0}"' USR1
    trap 'echo TERM >> "$FAKE_LOG/srun.signals"; exit "${FAKE_SRUN_RC:-0}"' TERM
    touch "$FAKE_LOG/srun.started"
    for _ in $(seq 600); do sleep 0.05; done
    exit 99 ;;
  exec)
    while [ "$#" -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done   # drop srun options
    export SLURM_PROCID=0 SLURM_LOCALID=0
    exec "$@" ;;
esac
"""

FAKE_SCONTROL = r"""#!/bin/bash
printf '%s\0' "$@" >> "$FAKE_LOG/scontrol.argv"
echo >> "$FAKE_LOG/scontrol.argv"
if [ "$1" = show ] && [ "$2" = hostnames ]; then
  printf 'node-a\nnode-b\n'
fi
"""


def _checkout(path: Path) -> Path:
    """A checkout as the job scripts need it: the slurm/env.sh they source, nothing else."""
    (path / "slurm").mkdir(parents=True)
    shutil.copy(ROOT / "slurm" / "env.sh", path / "slurm" / "env.sh")
    return path


@pytest.fixture
def fake(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RUN_", "MASTER_", "NCCL_", "FAKE_"))
           and k not in ("MAX_RESTARTS", "SRUN_ARGS", "PYTHON", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # submitted from a checkout without a .venv: the interpreter is python on PATH
    checkout = _checkout(tmp_path / "checkout")
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", FAKE_LOG=str(log),
               SLURM_JOB_ID="123", SLURM_JOB_NAME="gpt", SLURM_JOB_NODELIST="node-[a-b]",
               SLURM_NNODES="1", SLURM_NTASKS="2", SLURM_SUBMIT_DIR=str(checkout))
    return env, log


def _argv(path: Path) -> list[str]:
    return path.read_bytes().decode().split("\0")[:-1]


def _env(path: Path) -> dict[str, str]:
    items = [e.split("=", 1) for e in path.read_bytes().decode().split("\0") if "=" in e]
    return dict(items)


def _run(env, *args, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, check=False)


def test_syntax_and_shellcheck():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
    assert subprocess.run(["bash", "-n", str(ROOT / "slurm" / "env.sh")], check=False).returncode == 0
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout


def test_sbatch_defaults_present():
    text = SCRIPT.read_text()
    for line in ("--ntasks-per-node=8", "--gpus-per-node=8", "--output=logs/%x-%j.out",
                 "--signal=B:USR1@120", "--requeue", "--open-mode=append", "--time="):
        assert f"#SBATCH {line}" in text


def test_command_line_and_rendezvous(fake):
    env, log = fake
    proc = _run(env, "configs/x.json", "--set", "training.train_steps=7")
    assert proc.returncode == 0, proc.stderr
    argv = _argv(log / "srun.argv")
    assert argv == ["--kill-on-bad-exit=1", "python", "launch/pretrain.py", "--config",
                    "configs/x.json", "--set", "run.name=gpt-123", "--set", "training.train_steps=7"]
    srun_env = _env(log / "srun.env")
    assert srun_env["MASTER_ADDR"] == "node-a"
    assert srun_env["MASTER_PORT"] == str(20000 + 123)
    assert srun_env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert srun_env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert _argv(log / "scontrol.argv")[:3] == ["show", "hostnames", "node-[a-b]"]
    assert "requeue" not in (log / "scontrol.argv").read_text()


def test_entry_script_is_selectable_for_finetuning(fake):
    env, log = fake
    proc = _run({**env, "ENTRY": "launch/finetune.py"}, "configs/finetune_x.json")
    assert proc.returncode == 0, proc.stderr
    argv = _argv(log / "srun.argv")
    assert argv[1:4] == ["python", "launch/finetune.py", "--config"], argv


def test_hostile_names_are_not_evaluated(fake, tmp_path):
    env, log = fake
    marker = tmp_path / "pwned"
    env.update(RUN_NAME=f"$(id) my run; touch {marker}", RUN_DIR="/scratch/`id`/a b",
               SRUN_ARGS="--cpu-bind=cores   --label")
    cfg = "configs/with space $(id).json"
    proc = _run(env, cfg, "--set", f"data.tokenizer=$(touch {marker})")
    assert proc.returncode == 0, proc.stderr
    argv = _argv(log / "srun.argv")
    assert argv == ["--kill-on-bad-exit=1", "--cpu-bind=cores", "--label", "python",
                    "launch/pretrain.py", "--config", cfg, "--set",
                    f"run.name=$(id) my run; touch {marker}", "run.dir=/scratch/`id`/a b",
                    "--set", f"data.tokenizer=$(touch {marker})"]
    assert not marker.exists()
    assert "uid=" not in proc.stdout + proc.stderr + (log / "srun.argv").read_text()


def _start_waiting(env, log):
    env = dict(env, FAKE_SRUN_MODE="wait")
    proc = subprocess.Popen(["bash", str(SCRIPT), "configs/x.json"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (log / "srun.started").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "fake srun never started"
        time.sleep(0.05)
    return proc


def _requeues(log: Path) -> list[list[str]]:
    calls = [line.split("\0")[:-1] for line in (log / "scontrol.argv").read_text().split("\n")]
    return [c for c in calls if c and c[0] == "requeue"]


def test_usr1_is_forwarded_and_requeues(fake):
    env, log = fake
    proc = _start_waiting(env, log)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, (out, err)
    assert (log / "srun.signals").read_text().split() == ["USR1"]
    assert _requeues(log) == [["requeue", "123"]]
    assert "requeueing job 123" in out


def test_usr1_but_trainer_failed_is_not_requeued(fake):
    env, log = fake
    proc = _start_waiting(dict(env, FAKE_SRUN_RC="1"), log)
    proc.send_signal(signal.SIGUSR1)
    proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert (log / "srun.signals").read_text().split() == ["USR1"]
    assert _requeues(log) == []


def test_requeue_cap(fake):
    env, log = fake
    proc = _start_waiting(dict(env, SLURM_RESTART_COUNT="2", MAX_RESTARTS="2"), log)
    proc.send_signal(signal.SIGUSR1)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert _requeues(log) == [] and "MAX_RESTARTS=2 reached" in err


def test_term_is_forwarded_without_requeue(fake):
    env, log = fake
    proc = _start_waiting(env, log)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert (log / "srun.signals").read_text().split() == ["TERM"]
    assert _requeues(log) == []


def test_failure_is_not_requeued(fake):
    env, log = fake
    proc = _run(dict(env, FAKE_SRUN_RC="3"), "configs/x.json")
    assert proc.returncode == 3
    assert _requeues(log) == []


def test_generated_command_is_accepted_by_pretrain(fake, tmp_path):
    """The srun command line, executed for real with --dry-run: overrides parse, name sticks."""
    import json

    env, _log = fake
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_ctx": 64},
                               "data": {"seq_len": 64},
                               "training": {"micro_batch_size": 1, "global_batch_size": 2}}))
    env = dict(env, FAKE_SRUN_MODE="exec", PYTHON=sys.executable, RUN_NAME="a b $(id)",
               SLURM_SUBMIT_DIR=str(ROOT))
    proc = _run(env, str(cfg), "--set", "training.train_steps=3", "--dry-run", "--nodes", "1",
                "--gpus-per-node", "2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dry run: a b $(id)  world=2" in proc.stdout
    assert "in 3 steps" in proc.stdout


def _venv_checkout(tmp_path: Path) -> Path:
    """A submit directory that looks like a `make`-built checkout: an executable .venv python."""
    checkout = _checkout(tmp_path / "made")
    (checkout / ".venv" / "bin").mkdir(parents=True)
    py = checkout / ".venv" / "bin" / "python"
    py.write_text("#!/bin/sh\nexit 0\n")
    py.chmod(0o755)
    return checkout


def test_python_defaults_to_the_checkouts_venv(fake, tmp_path):
    env, log = fake
    checkout = _venv_checkout(tmp_path)
    proc = _run(dict(env, SLURM_SUBMIT_DIR=str(checkout)), "configs/x.json")
    assert proc.returncode == 0, proc.stderr
    assert _argv(log / "srun.argv")[1] == str(checkout / ".venv" / "bin" / "python")


def test_explicit_python_wins_over_the_venv(fake, tmp_path):
    env, log = fake
    checkout = _venv_checkout(tmp_path)
    proc = _run(dict(env, SLURM_SUBMIT_DIR=str(checkout), PYTHON="/opt/py/bin/python3"), "configs/x.json")
    assert proc.returncode == 0, proc.stderr
    assert _argv(log / "srun.argv")[1] == "/opt/py/bin/python3"


def test_no_venv_falls_back_to_python_on_path(fake):
    env, log = fake  # the fixture's checkout has no .venv
    assert _run(env, "configs/x.json").returncode == 0
    assert _argv(log / "srun.argv")[1] == "python"


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(),
                    reason="this checkout has no .venv (not set up with make)")
def test_sbatch_from_a_made_checkout_without_the_venv_active(fake):
    """The user's case: submitted from this checkout with neither the venv on PATH nor
    PYTHON nor PYTHONPATH set. The srun command (run for real, --dry-run) imports gpt_dist."""
    env, _log = fake
    env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    venv_bin = str(ROOT / ".venv" / "bin")
    path = [d for d in env["PATH"].split(os.pathsep) if d and Path(d).resolve() != Path(venv_bin).resolve()]
    env.update(PATH=os.pathsep.join(path), FAKE_SRUN_MODE="exec", SLURM_SUBMIT_DIR=str(ROOT))
    proc = _run(env, "configs/tiny_cpu.json", "--dry-run", "--nodes", "1", "--gpus-per-node", "2",
                timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "No module named" not in proc.stderr
    assert "dry run: gpt-123  world=2" in proc.stdout, proc.stdout[-2000:]


EVAL_SCRIPT = ROOT / "slurm" / "evaluate.sh"


def test_evaluate_script_runs_launch_evaluate(fake, tmp_path):
    """slurm/evaluate.sh: the same rendezvous as pretrain.sh, srun of launch/evaluate.py with
    the job's arguments untouched; with a real python under srun (exec mode) evaluate's own
    one-line error and exit status come back through the script."""
    env, log = fake
    assert subprocess.run(["bash", "-n", str(EVAL_SCRIPT)], check=False).returncode == 0
    args = ["--model", "runs/a b", "--tp", "2", "--tasks", "lambada,hellaswag", "--out", "r.json"]
    proc = subprocess.run(["bash", str(EVAL_SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    assert _argv(log / "srun.argv") == ["--kill-on-bad-exit=1", "python", "launch/evaluate.py", *args]
    srun_env = _env(log / "srun.env")
    assert (srun_env["MASTER_ADDR"], srun_env["MASTER_PORT"]) == ("node-a", str(20000 + 123))
    env.update(FAKE_SRUN_MODE="exec", PYTHON=sys.executable, SLURM_NTASKS="1", SLURM_SUBMIT_DIR=str(ROOT))
    proc = subprocess.run(["bash", str(EVAL_SCRIPT), "--model", str(tmp_path), "--tasks", "lambada",
                           "--local_rank=0"], env=env, capture_output=True, text=True, timeout=120,
                          cwd=ROOT, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "evaluate: error: --tasks lambada: needs --data-dir" in proc.stderr   # argv parsed, --local_rank too
    assert "evaluate.sh: srun exited with 2" in proc.stdout


@pytest.mark.parametrize("script", [SCRIPT, EVAL_SCRIPT], ids=["pretrain", "evaluate"])
def test_submitted_outside_a_checkout_is_one_line(fake, tmp_path, script):
    env, log = fake
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(["bash", str(script), "configs/x.json"], env=dict(env, SLURM_SUBMIT_DIR=str(elsewhere)),
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"{script.name}: no slurm/env.sh in {elsewhere}: submit from the repository root"
    assert not (log / "srun.argv").exists()
