"""Shared, lazily started 2-rank runs of the reliability suite (one per session each).

Every multi-process run is expensive on a 2-core machine, so each fixture below is one
torchrun job that several assertions share. The reference run (ZeRO-1, 12 steps, a
checkpoint every 4 steps, all three kept) is T1's first run and the baseline of T2/T3/T4/T5.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability import harness as h

STEPS = 12
SAVE = 4
COMMON = {"training__train_steps": STEPS, "checkpoint__save_interval": SAVE, "checkpoint__keep_last": 3}
STATE_SHA = {"GPT_DIST_TEST_STATE_SHA": "1"}


@pytest.fixture(scope="session")
def rel_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="session")
def data(rel_tmp: Path) -> Path:
    return h.build_shards(rel_tmp / "data" / "toy")


def launch(rel_tmp: Path, data: Path, name: str, *, env: dict[str, str] | None = None,
           max_restarts: int = 0, prepare=None, timeout: float = 300, **overrides) -> h.Result:
    run_dir = rel_tmp / name
    run_dir.mkdir(parents=True, exist_ok=True)
    if prepare is not None:
        prepare(run_dir)
    cfg = h.make_config(rel_tmp / f"{name}.json", run_dir, data, **{**COMMON, **overrides})
    return h.torchrun(cfg, run_dir, max_restarts=max_restarts, env={**STATE_SHA, **(env or {})},
                      timeout=timeout)


@pytest.fixture(scope="session")
def ref_run(rel_tmp: Path, data: Path) -> h.Result:
    res = launch(rel_tmp, data, "ref")
    assert res.rc == 0, res.describe()
    return res


@pytest.fixture(scope="session")
def ref_metrics(ref_run: h.Result) -> dict:
    m = h.metrics(ref_run.run_dir)
    assert sorted(m) == list(range(1, STEPS + 1)), sorted(m)
    return m
