"""T5: disk full during a save (GPT_DIST_TEST_ENOSPC_AT: rank 1's writes fail with ENOSPC).

Policy (checkpoint.on_disk_full): ``fail`` (default) stops every rank with an error naming
the path, ``latest`` still names the previous checkpoint and it verifies; ``continue`` drops
the save on every rank (the partial directory is deleted) and training goes on; the next
save succeeds. Neither leaves a rank waiting in a barrier: the ranks all-reduce a status.
The ``continue`` case shares its run with T7(a) (test_t07_nonfinite.py).
"""

from __future__ import annotations

import pytest

from gpt_dist.training import checkpoint as ckpt
from tests.reliability import conftest as c
from tests.reliability import harness as h

pytestmark = pytest.mark.slow


def test_fail_policy_stops_and_keeps_previous(rel_tmp, data):
    res = c.launch(rel_tmp, data, "t5_fail", training__train_steps=10, timeout=240,
                   env={"GPT_DIST_TEST_ENOSPC_AT": "8:1"})
    assert res.rc != 0, res.describe()
    root = res.run_dir / "checkpoints"
    assert f"{root / 'global_step8'}: save failed" in res.output, res.describe()
    assert "No space left on device" in res.output
    assert (root / "latest").read_text() == "global_step4"
    assert not (root / "global_step8").exists()  # the partial directory was deleted
    found = ckpt.find_resumable(res.run_dir)
    assert found is not None and found.tag == "global_step4"
    assert max(h.metrics(res.run_dir)) == 8  # stopped at the failed save, did not go on
    # fail-stop within PG timeout (60 s, tests/helpers.py) + 30 s of the failed save: timed from
    # the last step logged (just before that save), not from start-up, which a slow CPU stretches
    assert res.end_time - (res.run_dir / "metrics.jsonl").stat().st_mtime < 60 + 30, res.describe()
