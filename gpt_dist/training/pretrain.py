"""Pretraining, an application of the training core: ``LMObjective`` and ``pretrain(cfg)``,
everything ``launch/pretrain.py`` does after parsing.

    validate the config; the tokenizer's vocabulary size, end-of-document id, fingerprint
    training session (training/session.py): context, seeds, run directory, logger
        -> data (megatron-core GPTDataset over data.prefixes, checked against the tokenizer)
        -> engine -> checkpoint.init_from -> resume -> the loop with ``LMObjective``

In-training zero-shot evaluation (``training.eval_tasks``) uses evaluation's task scoring
(``gpt_dist.eval.training``): the one import between applications (docs/architecture.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from gpt_dist.config import Config, DataConfig, validate
from gpt_dist.eval.training import ZeroShot
from gpt_dist.parallel import ParallelContext
from gpt_dist.tokenizer import load_tokenizer
from gpt_dist.training.data import build_datasets, micro_batches, sample_ids_digest
from gpt_dist.training.hooks import TrainHooks
from gpt_dist.training.loop import TrainState
from gpt_dist.training.objective import Batch, Objective
from gpt_dist.training.session import training_session


class LMObjective(Objective):
    """Pretraining: L1 of GPT-1, the next-token loss, on megatron-core's ``GPTDataset``."""

    def __init__(self, cfg: Config, ctx: ParallelContext, datasets: Any) -> None:
        super().__init__(cfg, ctx)
        self.datasets = datasets
        # training.eval_tasks: task files read and checked now, before the first step
        self.zero_shot = (ZeroShot(cfg.model, cfg.data, cfg.training, cfg.zero_stage, ctx)
                          if cfg.training.eval_tasks else None)

    def micro_batches(self, step: int, consumed_samples: int) -> Iterator[Batch]:
        return micro_batches(self.datasets.train, self.ctx, self.cfg.training, consumed_samples, self.accum)

    def sample_digest(self, step: int, consumed_samples: int) -> str:
        return sample_ids_digest(self.ctx, self.cfg.training, consumed_samples, self.accum)

    def model_inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        return batch["tokens"], batch["labels"], batch["loss_mask"]

    def pipe_item(self, batch: Batch) -> tuple[Any, Any]:
        return batch["tokens"], (batch["labels"], batch["loss_mask"])

    def evaluate(self, eng: Any, step: int) -> dict[str, float]:
        """Mean validation loss over eval_steps global batches (the same batches every time),
        then the zero-shot tasks of ``training.eval_tasks`` (``TASK/METRIC``)."""
        cfg, ctx = self.cfg, self.ctx
        eng.ds.eval()
        losses = []
        with torch.no_grad():
            for i in range(cfg.training.eval_steps):
                batches = micro_batches(self.datasets.valid, ctx, cfg.training, i * cfg.training.global_batch_size,
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


def load_tokenizer_info(data: DataConfig) -> tuple[int, int, str]:
    """(vocab size, end-of-document id, fingerprint) of the run's tokenizer (``data.tokenizer``)."""
    tok = load_tokenizer(data.tokenizer)
    return tok.vocab_size, tok.eod_id, tok.fingerprint


def pretrain(cfg: Config, ctx: ParallelContext | None = None, hooks: TrainHooks | None = None) -> TrainState:
    """Pretrain; returns the final train state.

    ``ctx``: an existing parallel context (else one is built from the launcher's environment
    and destroyed at the end); ``hooks``: see ``gpt_dist.training.hooks`` (default: none)."""
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    vocab, eod, fingerprint = load_tokenizer_info(cfg.data)
    if vocab > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size: {cfg.model.vocab_size} < tokenizer vocabulary {vocab}")
    with training_session(cfg, fingerprint, ctx, hooks) as s:
        datasets = build_datasets(cfg.data, cfg.model, cfg.training, cfg.run_dir, s.ctx, vocab, eod, fingerprint)
        s.start()
        return s.train(LMObjective(cfg, s.ctx, datasets))
