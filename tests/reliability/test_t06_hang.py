"""T6: a dead or hung rank ends the job (no endless hang), and nothing survives it.

(a) rank 1 SIGKILLed at step 3: the survivor's next collective fails at once.
(b) rank 1 sleeps 600 s at step 3 outside any collective: the survivor's collective times
out (GPT_DIST_PG_TIMEOUT=15 s, also for megatron-core's groups), it exits,
and torchrun terminates the sleeper (SIGTERM only sets the trainer's stop flag, so after
torchrun's termination grace it is SIGKILLed). In both, the harness asserts that no process
of the job's session is left. The restart-and-continue variant is T2.
"""

from __future__ import annotations

import re

import pytest

from tests.reliability import conftest as c

pytestmark = pytest.mark.slow


def _detect_latency(res) -> float:
    """Seconds from the last logged step to the job's exit."""
    return res.end_time - (res.run_dir / "metrics.jsonl").stat().st_mtime


def test_killed_rank_ends_job_quickly(rel_tmp, data):
    res = c.launch(rel_tmp, data, "t6_kill", training__train_steps=5,
                   env={"GPT_DIST_TEST_KILL_AT": "3:1"})
    assert res.rc != 0, res.describe()
    assert "SIGKILL" in res.output or "exitcode  : -9" in res.output, res.describe()
    assert _detect_latency(res) < 30, res.describe()


def test_hung_rank_times_out(rel_tmp, data):
    res = c.launch(rel_tmp, data, "t6_hang", training__train_steps=5, timeout=300,
                   env={"GPT_DIST_TEST_KILL_AT": "3:1:hang", "GPT_DIST_PG_TIMEOUT": "15"})
    assert res.rc != 0, res.describe()
    assert re.search(r"(?i)timed? ?out", res.output), res.describe()
    assert _detect_latency(res) < 15 + 40 + 30, res.describe()
