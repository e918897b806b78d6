"""Sequence parallelism and activation checkpointing, 2 ranks (tp=2) on CPU/gloo, in-process.

One torch.multiprocessing run of sp_ac_worker.py measures everything; the tests read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import helpers

HERE = Path(__file__).resolve().parent
TOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("spac")
    proc = helpers.run(helpers.python_cmd(HERE / "sp_ac_worker.py", out), timeout=600)
    ranks = []
    for r in (0, 1):
        path = out / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote nothing (rc={proc.rc}):\n{proc.stderr[-4000:]}"
        data = json.loads(path.read_text())
        assert "error" not in data, f"rank {r}:\n{data['error']}"
        ranks.append(data)
    return ranks


pytestmark = pytest.mark.slow


def test_sequence_parallel_equals_none(results):
    for r in results:
        d = r["sp_vs_none"]
        assert d["loss_diff"] <= TOL and d["grad_diff"] <= TOL, d


@pytest.mark.parametrize("sp", [0, 1])
@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("partition", [0, 1])
def test_activation_checkpointing_same_loss_and_grads_with_dropout(results, sp, every, partition):
    for r in results:
        d = r[f"ac_every{every}_part{partition}_sp{sp}"]
        assert d["loss_diff"] <= TOL and d["grad_diff"] <= TOL, d


def test_dropout_is_on_and_repeatable(results):
    for r in results:
        assert r["dropout_active"]["loss_diff"] > 1e-4, r["dropout_active"]
        for sp in (0, 1):
            d = r[f"dropout_repeatable_sp{sp}"]
            assert d["loss_diff"] == 0.0 and d["grad_diff"] == 0.0, d
