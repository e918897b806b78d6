"""Fixtures of the launcher tests: toy shards and one uninterrupted 2-rank torchrun
reference run that every launcher must reproduce.

The launcher tests (real Slurm, mpirun, two network namespaces, preemption) all train the
same tiny config with 2 ranks and compare the per-step losses with the reference bit for
bit: the data position, RNG streams and reduction order do not depend on the launcher.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import helpers

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster_helpers import (
    ROOT,
    STEPS,
    build_toy_shards,
    clean_env,
    losses,
    run_logged,
    tail,
    torchrun_cmd,
    write_config,
)


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("toy")
    prefix = build_toy_shards(base / "data")
    return {"prefix": prefix, "tokenizer": str(helpers.toy_tokenizer())}


@pytest.fixture(scope="session")
def reference(tmp_path_factory, toy) -> dict[str, Any]:
    """The uninterrupted 2-rank torchrun run: per-step losses and its run directory."""
    base = tmp_path_factory.mktemp("reference")
    run_dir = base / "run"
    cfg = write_config(base / "cfg.json", toy, run_dir)
    t0 = time.time()
    proc = run_logged(torchrun_cmd(cfg), base / "torchrun.log", timeout=240,
                      env=clean_env(), cwd=ROOT)
    assert proc.returncode == 0, tail(base / "torchrun.log")
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)), got
    return {"losses": got, "run_dir": run_dir, "seconds": time.time() - t0, "toy": toy}
