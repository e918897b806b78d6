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

Two implementations: ``LMObjective`` (pretraining: next-token loss on token shards) here, and
``gpt_dist.finetune.objective.TaskObjective`` (GPT-1 fine-tuning: L3 = L2 + lambda L1 on task
examples). Zero-shot evaluation and the kernels reuse the same model inputs.
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


class LMObjective(Objective):
    """Pretraining: L1 of GPT-1, the next-token loss, on megatron-core's ``GPTDataset``."""

    def __init__(self, cfg: Config, ctx: ParallelContext, datasets: Any) -> None:
        super().__init__(cfg, ctx)
        self.datasets = datasets
        self.zero_shot = None  # training.eval_tasks (gpt_dist/eval/training.py); task files checked now
        if cfg.training.eval_tasks:
            from gpt_dist.eval.training import ZeroShot

            self.zero_shot = ZeroShot(cfg, ctx)

    def micro_batches(self, step: int, consumed_samples: int) -> Iterator[Batch]:
        from gpt_dist.training.data import micro_batches

        return micro_batches(self.datasets.train, self.ctx, self.cfg, consumed_samples, self.accum)

    def sample_digest(self, step: int, consumed_samples: int) -> str:
        from gpt_dist.training.data import sample_ids_digest

        return sample_ids_digest(self.ctx, self.cfg, consumed_samples, self.accum)

    def model_inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        return batch["tokens"], batch["labels"], batch["loss_mask"]

    def pipe_item(self, batch: Batch) -> tuple[Any, Any]:
        return batch["tokens"], (batch["labels"], batch["loss_mask"])

    def evaluate(self, eng: Any, step: int) -> dict[str, float]:
        """Mean validation loss over eval_steps global batches (the same batches every time),
        then the zero-shot tasks of ``training.eval_tasks`` (``TASK/METRIC``)."""
        from gpt_dist.training.data import micro_batches

        cfg, ctx = self.cfg, self.ctx
        eng.ds.eval()
        losses = []
        with torch.no_grad():
            for i in range(cfg.training.eval_steps):
                batches = micro_batches(self.datasets.valid, ctx, cfg, i * cfg.training.global_batch_size,
                                        self.accum)
                if eng.is_pipeline:  # eval_batch averages over micro-batches and dp itself
                    it = (self.pipe_item(b) for b in batches)
                    losses.append(eng.ds.eval_batch(data_iter=it).float().reshape(()))
                    continue
                for batch in batches:
                    losses.append(eng.ds(*self.model_inputs(batch)).float())
        zero_shot = self.zero_shot.run(eng.ds.module, step) if self.zero_shot is not None else {}
        eng.ds.train()
        mean = torch.stack(losses).mean().reshape(1)
        if not eng.is_pipeline:
            mean = self.dp_mean(mean)
        return {"loss": float(mean.item()), **zero_shot}
