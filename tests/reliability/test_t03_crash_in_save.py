"""T3: a crash during a checkpoint write never leaves a loadable half checkpoint.

One run, three crashes, one per torchrun attempt (GPT_DIST_TEST_CRASH_IN_SAVE):

* attempt 0: rank 1 SIGKILLed half-way through writing its step-8 ZeRO shard (a)
  -> resume from global_step4 (global_step8 has no manifest);
* attempt 1: rank 0 SIGKILLed at step 8 after every shard is written, before the manifest
  and ``latest`` (b) -> resume from global_step4 again;
* attempt 2: rank 0 SIGKILLed while retention deletes global_step4 after committing
  global_step12 (c) -> resume from global_step12, the newest committed checkpoint.

Then the run finishes at step 13, whose save removes the leftovers. Steps 1-12 must equal
the uninterrupted reference bit for bit.
"""

from __future__ import annotations

import json
import re

import pytest

from gpt_dist.training import checkpoint as ckpt
from tests.reliability import conftest as c
from tests.reliability import harness as h

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def crashed(rel_tmp, data) -> h.Result:
    return c.launch(rel_tmp, data, "t3", max_restarts=3, training__train_steps=13,
                    checkpoint__keep_last=2, timeout=420,
                    env={"GPT_DIST_TEST_CRASH_IN_SAVE": "8:1:mid_shard:0,8:0:before_commit:1,12:0:retention:2"})


def test_loader_picks_previous_committed_checkpoint(crashed, ref_metrics):
    res = crashed
    assert res.rc == 0, res.describe()
    assert res.restarts == 3, res.describe()
    resumed = re.findall(r"resumed from \S*/(global_step\d+)", res.output)
    assert resumed == ["global_step4", "global_step4", "global_step12"], res.describe()
    got = h.metrics(res.run_dir)
    assert h.diff_runs(ref_metrics, got, steps=list(range(1, c.STEPS + 1))) == []


def test_commit_state_after_the_crashes(crashed):
    assert crashed.rc == 0, crashed.describe()
    root = crashed.run_dir / "checkpoints"
    assert (root / "latest").read_text() == "global_step13"
    manifest = ckpt.verify(root / "global_step13")
    assert manifest["step"] == 13
    # retention kept the 2 newest committed; the half-deleted global_step4 and any temporary
    # files were removed by the last successful save
    entries = sorted(p.name for p in root.iterdir() if not p.name.startswith("zero_to_"))
    assert entries == [".manifest_key", "global_step12", "global_step13", "latest"], entries
    for tag in ("global_step12", "global_step13"):
        m = json.loads((root / tag / "manifest.json").read_text())
        assert all(f["size"] > 0 for f in m["files"].values())  # no 0-byte shard committed
        ckpt.verify(root / tag)


def test_retention_never_deletes_newest_and_ignores_uncommitted(tmp_path):
    root = tmp_path
    for step in (4, 8, 12):
        (root / f"global_step{step}").mkdir()
        (root / f"global_step{step}" / "manifest.json").write_text("{}")
    (root / "global_step16").mkdir()  # uncommitted leftover: not counted, removed
    (root / ".latest.tmp.123").write_text("x")
    ckpt._retention(root, keep_last=1, newest="global_step12")
    assert sorted(p.name for p in root.iterdir()) == ["global_step12"]
    ckpt._retention(root, keep_last=0, newest="global_step12")  # even keep_last=0 keeps the newest
    assert sorted(p.name for p in root.iterdir()) == ["global_step12"]
