"""gpt_dist.parallel.discover_launch_env: which launcher started this process.

The environments are those measured under slurm-wlm 22.05 and MPICH's hydra (see
test_slurm_real.py): srun tasks carry SLURM_STEP_ID and a per-task SLURM_PROCID; the batch
shell carries SLURM_PROCID=0 and the allocation's SLURM_NTASKS; mpirun's ranks inside an
allocation carry the SLURM_* of the srun step that started hydra's per-node proxies.
"""

from __future__ import annotations

import sys
import types

import pytest

from gpt_dist.parallel import discover_launch_env

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def env(monkeypatch):
    """A clean launcher environment, restored whole afterwards.

    discover_launch_env writes RANK/WORLD_SIZE/... itself; monkeypatch only undoes what it
    set, so without the snapshot a later in-process ParallelContext saw rank 5 of 8 (CI hang).
    """
    import os

    saved = dict(os.environ)
    yield from _env(monkeypatch)
    os.environ.clear()
    os.environ.update(saved)


def _env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_")) or k in LAUNCH_VARS:
            monkeypatch.delenv(k)

    def set_(**kv):
        for k, v in kv.items():
            monkeypatch.setenv(k, str(v))
        return os.environ

    yield set_


@pytest.fixture
def fake_mpi(monkeypatch):
    """mpi4py stand-in: COMM_WORLD of rank 3 of 8, node-local rank 1."""
    comm = types.SimpleNamespace(Get_rank=lambda: 3, Get_size=lambda: 8,
                                 bcast=lambda value, root: value if value is not None else "29999",
                                 Split_type=lambda kind: types.SimpleNamespace(Get_rank=lambda: 1))
    mpi = types.SimpleNamespace(COMM_WORLD=comm, COMM_TYPE_SHARED=0)
    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=mpi))
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", mpi)


def test_srun_task(env):
    e = env(SLURM_PROCID=5, SLURM_LOCALID=1, SLURM_NTASKS=8, SLURM_STEP_ID=0,
            SLURM_STEP_NUM_TASKS=8, MASTER_ADDR="node-a", MASTER_PORT=20123)
    assert discover_launch_env() == "srun"
    assert (e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"], e["MASTER_PORT"]) == ("5", "8", "1", "20123")


def test_srun_with_pmi2_is_still_srun(env):
    e = env(SLURM_PROCID=1, SLURM_LOCALID=1, SLURM_NTASKS=2, SLURM_STEP_ID=0,
            SLURM_STEP_NUM_TASKS=2, PMI_RANK=1, PMI_SIZE=2, MASTER_ADDR="h")
    assert discover_launch_env() == "srun"
    assert (e["RANK"], e["WORLD_SIZE"]) == ("1", "2")


def test_python_in_the_batch_shell_is_world_one(env):
    e = env(SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_NTASKS=2, MASTER_ADDR="node-a")
    assert discover_launch_env() == "python"
    assert (e["RANK"], e["WORLD_SIZE"]) == ("0", "1")


def test_mpirun_inside_an_allocation_asks_mpi(env, fake_mpi):
    # hydra started one proxy per node with srun (step 1, 2 tasks); 8 ranks in all
    e = env(SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_NTASKS=16, SLURM_STEP_ID=1,
            SLURM_STEP_NUM_TASKS=2, PMI_RANK=3, PMI_SIZE=8, MASTER_ADDR="node-a")
    assert discover_launch_env() == "mpirun"
    assert (e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"]) == ("3", "8", "1")


def test_mpirun_single_node_allocation(env, fake_mpi):
    e = env(SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_STEP_ID=1, SLURM_STEP_NUM_TASKS=1,
            PMI_RANK=3, PMI_SIZE=8, MASTER_ADDR="node-a")
    assert discover_launch_env() == "mpirun"
    assert (e["RANK"], e["WORLD_SIZE"]) == ("3", "8")


def test_torchrun_wins(env):
    e = env(RANK=1, WORLD_SIZE=2, SLURM_PROCID=0, SLURM_STEP_ID=0, SLURM_STEP_NUM_TASKS=4,
            MASTER_ADDR="x")
    assert discover_launch_env() == "torchrun/deepspeed"
    assert e["LOCAL_RANK"] == "0"
