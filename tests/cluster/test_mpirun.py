"""``mpirun -np 2`` launch (MPICH's hydra from the venv's ``mpich`` wheel).

gpt_dist.parallel.discover_launch_env sees PMI_* variables, asks MPI (mpi4py) for rank,
size, node-local rank and rank 0's address, and the run must reproduce the torchrun
reference bit for bit.
"""

from __future__ import annotations

import shutil

import pytest
from cluster_helpers import BIN, PY, ROOT, clean_env, losses, pretrain_args, run_logged, tail, write_config

pytestmark = pytest.mark.slow


def _mpirun() -> str:
    path = BIN / "mpirun"
    if path.exists():
        return str(path)
    found = shutil.which("mpirun")
    if not found:  # the venv's [mpi] extra installs the mpich wheel
        pytest.fail("no mpirun: install the project with `pip install -e .[mpi]` (mpich wheel)")
    return found


def test_mpirun_matches_torchrun(tmp_path, reference):
    pytest.importorskip("mpi4py")
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.json", reference["toy"], run_dir)
    cmd = [_mpirun(), "-np", "2", PY, *pretrain_args(cfg)]
    log = tmp_path / "mpirun.log"
    proc = run_logged(cmd, log, timeout=240, env=clean_env(), cwd=ROOT)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, tail(log)
    assert "[launcher] mpirun rank 0/2" in text and "[launcher] mpirun rank 1/2" in text, tail(log)
    assert losses(run_dir) == reference["losses"], tail(log)
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "global_step12"
    assert sorted(p.name for p in (root / "global_step12").glob("rng_rank_*.pt")) == [
        "rng_rank_00000.pt", "rng_rank_00001.pt"]
