"""What a run optimises, as the training loop sees it: ``Objective``.

The loop (``training/loop.py``) owns everything that does not depend on the task: the
DeepSpeed step and its accumulation contract, non-finite handling, signals, checkpoints and
exact resume, logging, the progress bar. An objective owns the rest:

* ``micro_batches(step, consumed)``: this rank's micro-batches of the next optimizer step,
  from the data position alone (so a resumed run reads exactly what the uninterrupted one did);
* ``model_inputs(batch)`` / ``loss(out)``: the positional arguments of the model for one
  micro-batch, and the scalar loss plus detached metrics from what the model returned;
* ``pipe_item(batch)`` / ``pipe_metrics()``: the same for DeepSpeed's pipeline engine, whose
  loss function runs inside the engine on the last stage;
* ``evaluate(eng)``: validation, returning named floats (``loss`` first).

Two implementations, each in its application: ``gpt_dist.training.pretrain.LMObjective``
(pretraining: next-token loss on token shards) and ``gpt_dist.finetune.objective.TaskObjective``
(GPT-1 fine-tuning: L3 = L2 + lambda L1 on task examples). The core imports neither.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from gpt_dist.config import Config
from gpt_dist.parallel import ParallelContext

Batch = dict[str, torch.Tensor]


class Objective:
    """Base class: the hooks the loop calls. See the module docstring."""

    #: Names of the per-step metrics ``loss`` returns besides the loss (logged as train/NAME).
    metric_names: tuple[str, ...] = ()

    def __init__(self, cfg: Config, ctx: ParallelContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.accum = cfg.grad_accum_steps(ctx.world_size)

    # -- data -------------------------------------------------------------------------
    def micro_batches(self, step: int, consumed_samples: int) -> Iterator[Batch]:
        raise NotImplementedError

    def sample_digest(self, step: int, consumed_samples: int) -> str:
        """A short hash of the global sample ids of one step (metrics.jsonl: resume proof)."""
        raise NotImplementedError

    def tokens_per_step(self, step: int, consumed_samples: int) -> int:
        """Tokens the step reads (for tokens/s and MFU)."""
        return self.cfg.training.global_batch_size * self.cfg.data.seq_len

    # -- one micro-batch --------------------------------------------------------------
    def model_inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def loss(self, out: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Model output -> (scalar loss to backpropagate, detached metrics [len(metric_names)])."""
        return out, None

    def pipe_item(self, batch: Batch) -> tuple[Any, Any]:
        raise NotImplementedError

    def pipe_metrics(self) -> torch.Tensor | None:
        """Mean metrics of the last pipeline step (pp > 1), the same tensor on every rank."""
        return None

    # -- evaluation -------------------------------------------------------------------
    def evaluate(self, eng: Any, step: int) -> dict[str, float]:
        raise NotImplementedError

    # -- shared helpers ---------------------------------------------------------------
    def dp_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over the data-parallel replicas (each holds the mean of equal-sized parts)."""
        if dist.is_initialized() and self.ctx.dp > 1:
            dist.all_reduce(t, group=self.ctx.dp_group)
            t = t / self.ctx.dp
        return t
