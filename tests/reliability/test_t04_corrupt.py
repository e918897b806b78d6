"""T4: a corrupted or missing checkpoint is detected before anything is loaded from it.

Unit tests on checkpoints written by the real saver (tests/reliability/fake.py), one per
test: a committed global_step10 and global_step5. ``resume`` must raise
CheckpointCorruptError naming the file, without ever reaching the engine's
``load_checkpoint`` (the sentinel weight stays unchanged); with on_corrupt=fallback it loads
global_step5 and logs what it skipped and why. The end-to-end fallback run (real DeepSpeed
files, exit codes) is at the bottom (slow).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import torch

from gpt_dist.config import config_from_dict
from gpt_dist.training import checkpoint as ckpt
from gpt_dist.training import loop
from tests.reliability import conftest as c
from tests.reliability import fake
from tests.reliability import harness as h


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, msg: str) -> None:
        self.lines.append(msg)


def _cfg(run_dir: Path, on_corrupt: str = "fail", **model):
    return config_from_dict({"run": {"dir": str(run_dir)}, "model": {**fake.MODEL, **model},
                             "checkpoint": {"on_corrupt": on_corrupt},
                             "deepspeed": {"zero_optimization": {"stage": 1}}})


def _resume(run_dir: Path, on_corrupt: str = "fail", **model):
    eng = fake.FakeEngine()
    eng.weight.fill_(-7.0)  # sentinel: perturbed before the load, so a no-op load is visible
    log = Log()
    state = loop.resume(_cfg(run_dir, on_corrupt, **model), fake.FakeCtx(), type("E", (), {"ds": eng})(),
                        loop.TrainState(), log)
    return eng, state, log


@pytest.fixture()
def run(tmp_path) -> Path:
    fake.make_run(tmp_path)
    return tmp_path


def test_intact_checkpoint_loads(run):
    eng, state, _log = _resume(run)
    assert eng.loads == ["global_step10"] and state.step == 10 and state.consumed_samples == 80
    assert torch.equal(eng.weight, torch.arange(6, dtype=torch.float32) + 2)


def _flip(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


SHARD = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
CASES = {
    "flip_byte": (lambda d: _flip(d / "global_step10" / SHARD), rf"{SHARD}: sha256 mismatch"),
    "truncate": (lambda d: _truncate(d / "global_step10" / SHARD), rf"{SHARD}: size \d+ != manifest"),
    "delete_shard": (lambda d: (d / "global_step10" / SHARD).unlink(), rf"{SHARD}: missing"),
    "delete_manifest": (lambda d: (d / "global_step10" / "manifest.json").unlink(),
                        r"manifest.json: missing"),
    "alter_manifest": (lambda d: (d / "global_step10" / "manifest.json").write_text(
        (d / "global_step10" / "manifest.json").read_text().replace('"step": 10', '"step": 11')),
        r"manifest.json: manifest signature does not match"),
    "garbage_manifest": (lambda d: (d / "global_step10" / "manifest.json").write_text("{not json"),
                         r"manifest.json: unreadable"),
    "extra_file": (lambda d: (d / "global_step10" / "evil.pt").write_bytes(b"x"),
                   r"files not in the manifest: \['evil.pt'\]"),
    "latest_missing_step": (lambda d: (d / "latest").write_text("global_step15"),
                            r"global_step15/manifest.json: missing"),
    "latest_abc": (lambda d: (d / "latest").write_text("abc"), r"'abc' is not of the form global_stepN"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corruption_detected_before_load(run, case):
    mutate, pattern = CASES[case]
    mutate(run / "checkpoints")
    t0 = time.monotonic()
    with pytest.raises(ckpt.CheckpointCorruptError, match=pattern):
        _resume(run)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("case", sorted(CASES))
def test_corruption_fallback_to_previous(run, case):
    mutate, pattern = CASES[case]
    mutate(run / "checkpoints")
    eng, state, log = _resume(run, on_corrupt="fallback")
    # a bad ``latest`` falls back to the newest committed checkpoint (10); a bad step 10 to 5
    want = 10 if case.startswith("latest") else 5
    assert eng.loads == [f"global_step{want}"] and state.step == want
    assert torch.equal(eng.weight, torch.arange(6, dtype=torch.float32) + want // 5)
    assert any(line.startswith("skipped checkpoint:") and re.search(pattern, line) for line in log.lines), log.lines


def test_no_valid_checkpoint_at_all_fails(run):
    _flip(run / "checkpoints" / "global_step10" / SHARD)
    _flip(run / "checkpoints" / "global_step5" / SHARD)
    with pytest.raises(ckpt.CheckpointCorruptError, match="no valid checkpoint"):
        _resume(run, on_corrupt="fallback")


def test_empty_run_starts_fresh(tmp_path):
    eng, state, _ = _resume(tmp_path)
    assert eng.loads == [] and state.step == 0


def test_manifest_key_mode_and_refusal(run):
    key = run / "checkpoints" / ".manifest_key"
    assert (key.stat().st_mode & 0o777) == 0o600
    os.chmod(key, 0o666)
    with pytest.raises(ckpt.CheckpointUntrustedError, match="writable by group/others"):
        _resume(run)


# --------------------------------------------------------------------------- end to end (slow)


@pytest.mark.slow
def test_fallback_run_resumes_from_previous(rel_tmp, data, ref_run, ref_metrics):
    """Real DeepSpeed files: step 8 corrupted, fallback resumes from 4 and matches the
    reference exactly (also the positive control of the copied-checkpoint resumes of T2's
    negative controls, and T12's benign config change: another log_interval)."""
    def prepare(d: Path) -> None:
        h.copy_checkpoint(ref_run.run_dir, d, "global_step4")
        h.copy_checkpoint(ref_run.run_dir, d, "global_step8")
        _flip(d / "checkpoints" / "global_step8" / SHARD)

    res = c.launch(rel_tmp, data, "t4_fallback", prepare=prepare, training__train_steps=6,
                   checkpoint__on_corrupt="fallback",
                   logging={**h.BASE_CONFIG["logging"], "log_interval": 3})
    assert res.rc == 0, res.describe()
    assert re.search(rf"skipped checkpoint: global_step8: \S*{SHARD}: sha256 mismatch", res.output), res.describe()
    assert "global_step4" in re.findall(r"resumed from \S*", res.output)[0]
    assert h.diff_runs(ref_metrics, h.metrics(res.run_dir), steps=[5, 6]) == []


@pytest.mark.slow
def test_explicit_failure_exits_nonzero(rel_tmp, data, ref_run):
    """on_corrupt=fail: the run exits non-zero naming the file; it never starts from scratch."""
    run_dir = rel_tmp / "t4_fail"
    h.copy_checkpoint(ref_run.run_dir, run_dir, "global_step8")
    _truncate(run_dir / "checkpoints" / "global_step8" / SHARD)
    cfg = h.make_config(rel_tmp / "t4_fail.json", run_dir, data, training__train_steps=10)
    res = h.python_single(cfg, run_dir)
    assert res.rc == 1, res.describe()
    assert f"{SHARD}: size" in res.stderr
    assert not (run_dir / "metrics.jsonl").exists() or not h.metrics(run_dir)
