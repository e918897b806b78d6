"""The one place that touches process groups: ``ParallelContext``.

Rank grid (Megatron order ``tp-dp-pp``, which is also DeepSpeed's
``PipeModelDataParallelTopology`` with axes ``[pipe, data, model]``)::

    global_rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

    e.g. tp=2, pp=2, dp=2 (8 ranks)
                 dp=0      dp=1
      stage 0:  [0, 1]    [2, 3]      <- each [..] is one TP group
      stage 1:  [4, 5]    [6, 7]

megatron-core's ``parallel_state`` holds the groups its parallel layers use (initialised
here, read by megatron-core's own layers internally); DeepSpeed gets an mpu adapter over
the same groups so ZeRO partitions over the data-parallel group only, and the pipeline
engine gets a topology with the same coordinates (checked at start-up). Everything else
receives the context (or its ``TPGroup``) explicitly: no module of the project outside this
one reads megatron-core's globals (``tests/test_layering.py`` checks it).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import torch
import torch.distributed as dist

from gpt_dist import deepspeed_compat
from gpt_dist.config import ParallelConfig


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def discover_launch_env() -> str:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from whichever launcher started us.

    torchrun and the DeepSpeed launcher set them already; ``srun`` sets SLURM_*; ``mpirun``
    sets OMPI_*/PMI_* (we then ask MPI through mpi4py, which DeepSpeed's discovery uses).
    A plain ``python`` run is world size 1. Returns the launcher's name for the logs.
    """
    return _discover(os.environ)


def launch_world_size() -> int:
    """The world size the launcher gives this process, read without changing the environment
    (the resume check needs it before the context is built; ``discover_launch_env`` then
    still sees, and names, the launcher itself)."""
    env = dict(os.environ)
    _discover(env)
    return int(env["WORLD_SIZE"])


def _discover(env: Any) -> str:
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        return "torchrun/deepspeed"
    # A task of an srun step (SLURM_STEP_ID set): SLURM_PROCID is per task and the step's own
    # size counts. The batch shell, and mpirun/python started from it, inherit SLURM_PROCID=0
    # and the allocation's SLURM_NTASKS without being srun tasks, and mpirun's ranks inside an
    # allocation see the SLURM_* of the srun step that started its per-node proxies: taking
    # those would give every rank of a node the same rank (tests/cluster/test_launch_env.py).
    step_tasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    mpi_size = next((env[k] for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
                     if k in env), None)
    mpi_rank = next((env[k] for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
                     if k in env), None)
    srun_task = ("SLURM_PROCID" in env and "SLURM_STEP_ID" in env and step_tasks > 1
                 and (mpi_size is None or (int(mpi_size) == step_tasks
                                           and mpi_rank in (None, env["SLURM_PROCID"]))))
    if srun_task and "MASTER_ADDR" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = str(step_tasks)
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_PORT", "29500")
        return "srun"
    mpi_keys = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
    if any(k in env for k in mpi_keys):
        from mpi4py import MPI  # only imported under mpirun

        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
        master = comm.bcast(socket.gethostbyname(socket.gethostname()) if rank == 0 else None, 0)
        port = comm.bcast(env.get("MASTER_PORT") or (str(_free_port()) if rank == 0 else None), 0)
        local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        env.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local),
                   MASTER_ADDR=env.get("MASTER_ADDR", master), MASTER_PORT=str(port))
        return "mpirun"
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    return "python"


@dataclass(frozen=True)
class TPGroup:
    """The tensor-parallel group as the model's own code sees it (the sequence-parallel
    regions, the padded-vocabulary mask, the vocabulary-parallel argmax and cross entropy):
    handed down explicitly from the ``ParallelContext`` through ``ModelSpec``, so no layer of
    the project reads megatron-core's globals. ``group`` None with ``size`` 1: no TP."""

    group: Any = None
    size: int = 1
    rank: int = 0

    @property
    def src_rank(self) -> int:
        """Global rank of TP rank 0 of this group (broadcast source)."""
        if self.group is None or self.size == 1:
            return dist.get_rank() if dist.is_initialized() else 0
        return dist.get_global_rank(self.group, 0)


class MegatronMPU:
    """DeepSpeed's ``mpu`` interface over the context's groups.

    DeepSpeed asks the mpu for the "model parallel" group to reduce norms of TP-sharded
    parameters, and for the data-parallel group to partition ZeRO state over.
    """

    def __init__(self, ctx: ParallelContext) -> None:
        self.ctx = ctx

    def get_model_parallel_group(self) -> Any:
        return self.ctx.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.ctx.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.ctx.tp

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ctx.tensor_parallel.src_rank

    def get_data_parallel_group(self) -> Any:
        return self.ctx.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.ctx.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.ctx.dp

    def get_pipe_parallel_group(self) -> Any:
        return self.ctx.pp_group

    def get_sequence_parallel_world_size(self) -> int:
        return 1


class StageMPU(MegatronMPU):
    """The mpu of one pipeline stage's own DeepSpeed engine (ZeRO-2/3 under pp > 1,
    ``gpt_dist.training.stages``).

    * model parallel = the TP x PP group of this data-parallel replica: ZeRO's gradient norm
      all-reduces over it, so clipping sees the norm over every stage;
    * model-parallel rank = this rank's place in that group, unique per (stage, TP rank): the
      rank in DeepSpeed's checkpoint file names (``..._mp_rank_XX_...``), so stages never
      overwrite each other's files;
    * tensor-parallel rank = the TP rank: what ZeRO-1/2 count TP-replicated parameters by
      (ZeRO-3 reads the model-parallel rank instead: ``deepspeed_compat.zero3_norm_by_tp_rank``).
    """

    def get_model_parallel_group(self) -> Any:
        return self.ctx.model_parallel_group

    def get_model_parallel_rank(self) -> int:
        return self.ctx.pp_rank * self.ctx.tp + self.ctx.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.ctx.tp * self.ctx.pp

    # tensor parallel stays what MegatronMPU's model parallel is
    get_tensor_model_parallel_group = MegatronMPU.get_model_parallel_group
    get_tensor_model_parallel_rank = MegatronMPU.get_model_parallel_rank
    get_tensor_model_parallel_world_size = MegatronMPU.get_model_parallel_world_size


@dataclass
class ParallelContext:
    """Sizes, coordinates, device and groups of this rank; built once per process.

    A context manager: leaving the ``with`` block destroys what this context created
    (megatron-core's model-parallel state, and the default process group when this context
    initialised it), on every exit path, errors and ``SystemExit`` included. Left to
    interpreter shutdown, gloo's threads are sometimes destroyed while joinable
    ("terminate called without an active exception", SIGABRT) after all work succeeded."""

    tp: int
    pp: int
    dp: int
    world_size: int
    rank: int
    local_rank: int
    device: torch.device
    sequence_parallel: bool = False
    launcher: str = "python"
    topology: Any = field(default=None, repr=False)
    _groups: dict[str, Any] = field(default_factory=dict, repr=False)
    _owns_process_group: bool = field(default=False, repr=False)
    _owns_model_parallel: bool = field(default=False, repr=False)
    _destroyed: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.tp * self.pp * self.dp != self.world_size:
            raise ValueError(
                f"tp ({self.tp}) * pp ({self.pp}) * dp ({self.dp}) != world size ({self.world_size})"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_env(cls, pcfg: ParallelConfig, *, device: str = "auto",
                 timeout_s: float | None = None) -> ParallelContext:
        """Initialise torch.distributed (via DeepSpeed) and megatron-core's groups."""
        launcher = discover_launch_env()
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        if use_cuda:
            torch.cuda.set_device(local_rank)
            dev = torch.device("cuda", local_rank)
        else:
            dev = torch.device("cpu")
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if timeout_s is None:
            timeout_s = float(os.environ.get("GPT_DIST_PG_TIMEOUT", "1800"))
        if world % (pcfg.tp * pcfg.pp):
            raise ValueError(f"world size {world} is not divisible by tp*pp = {pcfg.tp * pcfg.pp}")
        import deepspeed

        if not use_cuda:
            deepspeed_compat.skip_shm_comm_build()
        owns_pg = not dist.is_initialized()
        if owns_pg:
            deepspeed.init_distributed(
                dist_backend="nccl" if use_cuda else "gloo",
                auto_mpi_discovery=False,
                timeout=datetime.timedelta(seconds=timeout_s),
                rank=rank, world_size=world,
            )
        ctx = cls(tp=pcfg.tp, pp=pcfg.pp, dp=world // (pcfg.tp * pcfg.pp), world_size=world,
                  rank=rank, local_rank=local_rank, device=dev,
                  sequence_parallel=pcfg.sequence_parallel, launcher=launcher)
        ctx._owns_process_group = owns_pg
        try:
            ctx._init_groups(timeout_s)
        except BaseException:
            ctx.destroy()
            raise
        return ctx

    def _init_groups(self, timeout_s: float) -> None:
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            sizes = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
            if sizes != (self.tp, self.pp):
                raise RuntimeError(f"a parallel context with tp={sizes[0]}, pp={sizes[1]} is still alive in "
                                   f"this process; leave it (or destroy it) before building tp={self.tp}, "
                                   f"pp={self.pp}")
        else:
            ps.initialize_model_parallel(
                tensor_model_parallel_size=self.tp,
                pipeline_model_parallel_size=self.pp,
                # a float is fine: megatron-core only builds timedelta(minutes=...) from it
                distributed_timeout_minutes=timeout_s / 60,
                create_gloo_process_groups=False,
            )
            self._owns_model_parallel = True
        self.topology = PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp)
        coord = self.topology.get_coord(self.rank)
        mine = (ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(),
                ps.get_tensor_model_parallel_rank())
        if (coord.pipe, coord.data, coord.model) != mine:  # the two grids must agree
            raise RuntimeError(f"rank {self.rank}: DeepSpeed topology {coord} != megatron {mine}")
        self._groups = {
            "tp": ps.get_tensor_model_parallel_group(),
            "dp": ps.get_data_parallel_group(),
            "pp": ps.get_pipeline_model_parallel_group(),
            "mp": ps.get_model_parallel_group(),
            "embedding": ps.get_embedding_group(),
        }

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.barrier()  # no rank tears its groups down while another still uses them
        self.destroy()

    def destroy(self) -> None:
        """Destroy what this context created (idempotent; see the class docstring)."""
        if self._destroyed:
            return
        self._destroyed = True
        self._groups = {}
        from megatron.core import parallel_state as ps

        if self._owns_model_parallel or self._owns_process_group:
            ps.destroy_model_parallel()
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ coordinates
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def stage_stride(self) -> int:
        """Global-rank distance between consecutive pipeline stages (same tp and dp rank)."""
        return self.tp * self.dp

    @property
    def prev_stage_rank(self) -> int | None:
        """Global rank of the previous stage's peer (None on the first stage)."""
        return None if self.is_first_stage else self.rank - self.stage_stride

    @property
    def next_stage_rank(self) -> int | None:
        """Global rank of the next stage's peer (None on the last stage)."""
        return None if self.is_last_stage else self.rank + self.stage_stride

    @property
    def first_stage_rank(self) -> int:
        """Global rank of this pipeline's first stage (same tp and dp rank)."""
        return self.rank - self.pp_rank * self.stage_stride

    @property
    def last_stage_rank(self) -> int:
        """Global rank of this pipeline's last stage (same tp and dp rank)."""
        return self.first_stage_rank + (self.pp - 1) * self.stage_stride

    @staticmethod
    def coords_of(rank: int, tp: int, pp: int, dp: int) -> tuple[int, int, int]:
        """(pp, dp, tp) of ``rank`` in the grid above; used by --dry-run and tests."""
        return rank // (tp * dp), (rank // tp) % dp, rank % tp

    # ------------------------------------------------------------------ groups
    def _group(self, name: str) -> Any:
        if name not in self._groups:
            raise RuntimeError("this ParallelContext has been destroyed" if self._destroyed
                               else "this ParallelContext has no process groups")
        return self._groups[name]

    @property
    def tp_group(self) -> Any:
        return self._group("tp")

    @property
    def dp_group(self) -> Any:
        return self._group("dp")

    @property
    def pp_group(self) -> Any:
        return self._group("pp")

    @property
    def model_parallel_group(self) -> Any:
        """TP x PP ranks of one data-parallel replica."""
        return self._group("mp")

    @property
    def embedding_group(self) -> Any:
        """The first and the last pipeline stage of this (TP, DP) position: the ranks that hold
        the tied token embedding (megatron-core's embedding group)."""
        return self._group("embedding")

    @property
    def tensor_parallel(self) -> TPGroup:
        """The TP group for the model's own layers (``ModelSpec.tp_group``)."""
        return TPGroup(self.tp_group if self.tp > 1 else None, self.tp, self.tp_rank)

    def mpu(self) -> MegatronMPU:
        return MegatronMPU(self)

    def stage_mpu(self) -> StageMPU:
        return StageMPU(self)

    def barrier(self) -> None:
        if dist.is_initialized() and not self._destroyed:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a decision only rank 0 may take)."""
        if not dist.is_initialized() or self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (small, picklable objects)."""
        if not dist.is_initialized() or self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_max(self, value: float) -> float:
        """Max of a scalar over all ranks (flags: stop, save-now, non-finite)."""
        if not dist.is_initialized() or self.world_size == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())
