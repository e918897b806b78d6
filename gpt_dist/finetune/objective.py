"""GPT-1 fine-tuning as an ``Objective`` of the shared training loop.

The loop does the DeepSpeed step, checkpoints, exact resume, signals, non-finite handling,
logging and the progress bar; this objective supplies the task's micro-batches and losses:

* data position: with ``n = consumed_samples // global_batch`` global batches consumed, the
  next step is batch ``n % steps_per_epoch`` of epoch ``n // steps_per_epoch``; each epoch's
  order is a permutation fixed by (seed, epoch), and the last partial batch is dropped so
  every step has the same size. The checkpointed ``consumed_samples`` (the loop's data
  position, as in pretraining) is therefore the whole position: a resumed run continues
  mid-epoch exactly.
* one micro-batch: ``GPT.forward(tokens, lm_labels, lm_mask, extract_pos, task_labels)``
  returns ``TaskHead.objective``'s (L3, [L1, L2], task logits); under pp > 1 the same
  function is the pipeline's loss (``pipeline.TaskLoss``), which keeps the parts for us.
* evaluation: every example once, in file order, split over the data-parallel ranks with
  equal counts (ZeRO-3 gathers parameters collectively in every forward, so every rank must
  run the same number of them; the few padding slots are dropped), predictions gathered,
  then ``metrics.compute_metrics``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gpt_dist.config import Config
from gpt_dist.finetune.batches import EpochSampler, collate
from gpt_dist.finetune.metrics import compute_metrics
from gpt_dist.finetune.tasks import Example, TaskSpec
from gpt_dist.parallel import ParallelContext
from gpt_dist.training.objective import Batch, Objective


class TaskObjective(Objective):
    """L3 = L2 + lambda * L1 on task examples (see the module docstring)."""

    def __init__(self, cfg: Config, ctx: ParallelContext, spec: TaskSpec, train: list[Example],
                 valid: list[Example] | None, pad_id: int, pipe_loss: Any = None) -> None:
        super().__init__(cfg, ctx)
        self.spec, self.train, self.valid, self.pad_id = spec, train, valid, pad_id
        self.pipe_loss = pipe_loss
        t = cfg.training
        self.sampler = EpochSampler(len(train), t.global_batch_size, seed=t.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        if self.steps_per_epoch < 1:
            raise ValueError(f"{cfg.finetune.train_file}: {len(train)} examples, fewer than one global batch "
                             f"(training.global_batch_size={t.global_batch_size})")
        self.metric_names = ("lm_loss", "task_loss") + (() if spec.regression else ("task_acc",))
        # pp > 1: the pipeline engine needs one activation shape for every micro-batch
        self.fixed_len = spec.max_len if ctx.pp > 1 else None
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    # -- data -------------------------------------------------------------------------
    def epoch_and_index(self, step: int) -> tuple[int, int]:
        return divmod(step, self.steps_per_epoch)

    def _global_batch(self, consumed_samples: int) -> list[int]:
        """The example ids of the global batch at this data position (samples consumed)."""
        epoch, index = self.epoch_and_index(consumed_samples // self.cfg.training.global_batch_size)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, self.sampler.batches_for(epoch))
        return self._epoch_cache[1][index]

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.ctx.device) for k, v in batch.items()}

    def micro_batches(self, step: int, consumed_samples: int) -> Iterator[Batch]:
        ids, mb, dp = self._global_batch(consumed_samples), self.cfg.training.micro_batch_size, self.ctx.dp
        for m in range(self.accum):
            start = m * dp * mb + self.ctx.dp_rank * mb
            mine = [self.train[i] for i in ids[start:start + mb]]
            yield self._to_device(collate(mine, self.pad_id, max_len=self.fixed_len))

    def sample_digest(self, step: int, consumed_samples: int) -> str:
        return hashlib.sha256(json.dumps(self._global_batch(consumed_samples)).encode()).hexdigest()[:16]

    def tokens_per_step(self, step: int, consumed_samples: int) -> int:
        """Real (unpadded) tokens of the examples the step reads (for tok/s and MFU)."""
        return int(sum(len(s) for i in self._global_batch(consumed_samples) for s in self.train[i].sequences))

    # -- one micro-batch --------------------------------------------------------------
    def model_inputs(self, batch: Batch) -> tuple[Any, ...]:
        return (batch["tokens"], batch["lm_labels"], batch["lm_mask"], batch["extract_pos"], batch["task_labels"])

    def _metrics(self, parts: torch.Tensor, task_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.spec.regression:
            return parts.float()
        acc = (task_logits.argmax(dim=-1) == labels.long()).float().mean().reshape(1)
        return torch.cat([parts.float(), acc])

    def loss(self, out: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        loss, parts, task_logits = out
        return loss, self._metrics(parts, task_logits, batch["task_labels"])

    def pipe_item(self, batch: Batch) -> tuple[Any, Any]:
        return batch["tokens"], (batch["lm_labels"], batch["lm_mask"], batch["extract_pos"], batch["task_labels"])

    def pipe_metrics(self) -> torch.Tensor | None:
        """Mean of the last stage's recorded parts, broadcast from the last stage to all."""
        out = torch.zeros(len(self.metric_names), dtype=torch.float32, device=self.ctx.device)
        loss_fn = self.pipe_loss
        if self.ctx.is_last_stage and loss_fn is not None and loss_fn.records:
            rows = [self._metrics(p, lg, lb) for p, lg, lb in loss_fn.records]
            out = self.dp_mean(torch.stack(rows).mean(dim=0).to(self.ctx.device))
        if loss_fn is not None:
            loss_fn.records.clear()
        return self._from_last_stage(out)

    def _from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        """The last pipeline stage's ``t`` on every stage (the others pass a same-shaped tensor)."""
        if dist.is_initialized() and self.ctx.pp > 1:
            dist.broadcast(t, src=dist.get_global_rank(self.ctx.pp_group, self.ctx.pp - 1), group=self.ctx.pp_group)
        return t

    # -- evaluation and prediction ----------------------------------------------------
    def predict(self, eng: Any, examples: list[Example]) -> tuple[np.ndarray, np.ndarray]:
        """Task logits [n, outputs] (float64) and [L1, L2] over ``examples``, on every rank:
        L1 the mean over every LM token of the examples, L2 the mean over the examples, both
        independent of how the examples fall into micro-batches and ranks.

        Every rank runs the same number of full micro-batches (padding slots are empty: masks
        0, dropped; a slot-less batch repeats example 0 with weight 0): ZeRO-3 gathers
        parameters in every forward and the pipeline keeps the shapes of its first batch. Under pp > 1 one ``eval_batch`` runs as many different
        micro-batches as the engine's schedule has. Unlabelled examples (prediction inputs)
        are scored with a dummy label; their L2 is meaningless and is not used."""
        ctx, mb = self.ctx, self.cfg.training.micro_batch_size
        per_rank = math.ceil(len(examples) / (ctx.dp * mb)) * mb
        mine = list(range(ctx.dp_rank, len(examples), ctx.dp))
        mine += [-1] * (per_rank - len(mine))
        chunks = [mine[c:c + mb] for c in range(0, per_rank, mb)]
        group = eng.ds.micro_batches if eng.is_pipeline else 1
        rows: list[tuple[int, list[float]]] = []
        parts_sum, parts_n = np.zeros(2), np.zeros(2)
        was_training = eng.ds.module.training
        eng.ds.eval()
        with torch.no_grad():
            for g in range(0, len(chunks), group):
                idxs = chunks[g:g + group]
                slots = [[_with_valid_label(examples[i], self.spec) if i >= 0 else None for i in idx] for idx in idxs]
                slots = [ex if any(e is not None for e in ex) else [_with_valid_label(examples[0], self.spec), *ex[1:]]
                         for ex in slots]
                batches = [self._to_device(collate(ex, self.pad_id, max_len=self.fixed_len)) for ex in slots]
                if eng.is_pipeline:
                    outs = self._pipe_forward(eng, batches)
                else:
                    outs = [eng.ds(*self.model_inputs(b))[1:] for b in batches]
                for idx, batch, (parts, logits) in zip(idxs, batches, outs, strict=True):
                    real = [j for j, i in enumerate(idx) if i >= 0]
                    rows += [(idx[j], logits[j].double().cpu().tolist()) for j in real]
                    # L1 is this micro-batch's mean over its LM tokens (padding slots have none):
                    # weighted by them, the sum over micro-batches is the mean over every token
                    tokens = float(batch["lm_mask"].sum()) if real else 0.0
                    parts_sum += parts.double().cpu().numpy() * np.array([tokens, len(real)])
                    parts_n += np.array([tokens, len(real)])
        if was_training:
            eng.ds.train()
        gathered: list[Any] = [(rows, parts_sum.tolist(), parts_n.tolist())]
        if dist.is_initialized() and ctx.dp > 1:
            gathered = [None] * ctx.dp
            dist.all_gather_object(gathered, (rows, parts_sum.tolist(), parts_n.tolist()), group=ctx.dp_group)
        all_rows = sorted(r for g in gathered for r in g[0])
        logits_np = np.array([r[1] for r in all_rows], dtype=np.float64)
        weights = np.sum([g[2] for g in gathered], axis=0)
        mean_parts = np.sum([g[1] for g in gathered], axis=0) / np.maximum(weights, 1)
        return logits_np, mean_parts

    def _pipe_forward(self, eng: Any, batches: list[Batch]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Up to ``eng.ds.micro_batches`` evaluation micro-batches in one pipeline schedule
        (a short group is filled with repeats of its last batch, whose outputs are dropped);
        the last stage's ([L1, L2], task logits) of each, on every stage."""
        m = eng.ds.micro_batches
        items = [self.pipe_item(b) for b in batches] + [self.pipe_item(batches[-1])] * (m - len(batches))
        eng.ds.eval_batch(data_iter=iter(items), compute_loss=True)
        n = batches[0]["task_labels"].shape[0]
        width = self.spec.sequences_per_example if self.spec.task == "multiple_choice" else self.cfg.finetune.head_outputs()
        out = torch.zeros(len(batches), n, width + 2, dtype=torch.float32, device=self.ctx.device)
        loss_fn = self.pipe_loss
        if self.ctx.is_last_stage:
            for k, (parts, logits, _) in enumerate(loss_fn.records[:len(batches)]):
                out[k] = torch.cat([logits.float().reshape(n, width), parts.float().expand(n, 2)], dim=1)
        loss_fn.records.clear()
        out = self._from_last_stage(out)
        return [(out[k, 0, width:], out[k, :, :width]) for k in range(len(batches))]

    def evaluate(self, eng: Any, step: int) -> dict[str, float]:
        if not self.valid:
            return {}
        logits, parts = self.predict(eng, self.valid)
        return {"lm_loss": float(parts[0]), **self.task_metrics(logits, self.valid)}

    def task_metrics(self, logits: np.ndarray, examples: list[Example]) -> dict[str, float]:
        """L2 and the task's metrics of gathered logits against the examples' labels."""
        labels = np.array([ex.label for ex in examples])
        preds, scores = predictions(logits, self.spec)
        out = {"task_loss": task_loss_of(logits, labels, self.spec)}
        out.update(compute_metrics(self.spec, preds, labels, scores))
        return out


def predictions(logits: np.ndarray, spec: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class / score per example, probabilities or scores) from task logits."""
    if spec.regression:
        s = logits.reshape(-1)
        return s, s
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return p.argmax(axis=1), p


def prediction_rows(examples: list[Example], logits: np.ndarray, spec: TaskSpec) -> list[dict[str, Any]]:
    """One row per example: its file line, the prediction (label name when the task has
    names), the class/choice probabilities (or the score, for regression)."""
    preds, probs = predictions(logits, spec)
    names = list(spec.label_names) if spec.label_names else None
    rows = []
    for ex, pred, prob in zip(examples, preds, probs, strict=True):
        row: dict[str, Any] = {"line": ex.line}
        if spec.regression:
            row["score"] = float(pred)
        else:
            row["label"] = names[int(pred)] if names else int(pred)
            row["probabilities"] = [round(float(p), 6) for p in prob]
        rows.append(row)
    return rows


def task_loss_of(logits: np.ndarray, labels: np.ndarray, spec: TaskSpec) -> float:
    """L2 over labelled examples, from the gathered logits (the same formula as the head)."""
    if spec.regression:
        ok = ~np.isnan(labels.astype(np.float64))
        return float(np.mean((logits.reshape(-1)[ok] - labels[ok]) ** 2)) if ok.any() else float("nan")
    ok = labels >= 0
    if not ok.any():
        return float("nan")
    z = logits[ok] - logits[ok].max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(ok.sum()), labels[ok].astype(int)].mean())


def _with_valid_label(ex: Example, spec: TaskSpec) -> Example:
    """Unlabelled examples get label 0 (regression: 0.0) so the head's loss is defined."""
    bad = (isinstance(ex.label, float) and math.isnan(ex.label)) or (not spec.regression and ex.label < 0)
    if not bad:
        return ex
    return Example(ex.sequences, 0.0 if spec.regression else 0, ex.line, ex.truncated)
