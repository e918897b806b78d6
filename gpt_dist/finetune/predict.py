"""Run a fine-tuned model on new examples: ``launch/predict.py``, on the inference runtime.

The export (native; or a Hugging Face DoubleHeads directory for multiple choice) or run
directory carries the model, W_y, the tokenizer and the fine-tuning config: the model and its
head are built from the run's own settings (``inference.load_model(task_head=True)``: its
``finetune`` section, as training built them) and the input file is read with exactly the
transformations and truncation the model was trained with. One process runs the whole model;
N processes split it TP x PP ways (``tp * pp`` = the world size), each example's task logits
coming from the last stage (``inference.Classify``). What stays here is the fine-tuning side:
task files, batches, prediction rows and metrics.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt_dist import inference
from gpt_dist.config import Config, config_from_dict
from gpt_dist.finetune.batches import collate
from gpt_dist.finetune.metrics import compute_metrics
from gpt_dist.finetune.objective import _with_valid_label, prediction_rows, predictions
from gpt_dist.finetune.task_data import task_spec
from gpt_dist.finetune.tasks import TaskSpec, read_task_file
from gpt_dist.inference import Classify, InferenceError, LoadedModel, Runner
from gpt_dist.parallel import ParallelContext
from gpt_dist.utils import atomic_write_text


def load_classifier(path: str | Path, ctx: ParallelContext) -> tuple[LoadedModel, TaskSpec | Config]:
    """(the model with its task head on this rank's part of ``ctx``, the task spec) of a
    fine-tuned export or run. For multiple choice the spec depends on the input file (its
    number of choices): the run's config comes back instead (``spec_for``)."""
    if ctx.dp != 1:
        raise InferenceError(f"predict: tp ({ctx.tp}) x pp ({ctx.pp}) must be the world size "
                             f"({ctx.world_size}): no data parallelism")
    loaded = inference.load_model(path, ctx, task_head=True)
    training = loaded.training_config or {}
    if training.get("finetune"):
        cfg = config_from_dict({**training, "checkpoint": {**training.get("checkpoint", {}), "init_from": None}})
    else:  # a Hugging Face DoubleHeads directory: multiple choice, the model's context
        mcfg = loaded.cfg
        cfg = config_from_dict({"model": {k: getattr(mcfg, k) for k in ("arch", "n_layer", "n_head", "n_embd",
                                                                         "n_ctx", "vocab_size")},
                                "finetune": {"task": "multiple_choice", "train_file": ""}})
    assert loaded.task is not None
    return loaded, (task_spec(cfg.finetune, cfg.model, cfg.sequence_length) if loaded.task.task != "multiple_choice" else cfg)


def spec_for(spec: TaskSpec | Config, input_path: str | Path, tok: Any) -> TaskSpec:
    """The task spec for reading ``input_path`` (multiple choice: its number of choices)."""
    if isinstance(spec, TaskSpec):
        return spec
    ft = dataclasses.replace(spec.finetune, train_file=str(input_path), num_choices=None)
    return task_spec(ft, spec.model, spec.sequence_length)  # max_len: replace() kept it


def task_logits(runner: Runner, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Task logits [B, n] (fp32, every rank) of one collated batch (``batches.collate``)."""
    n = batch["task_labels"].shape[0]
    return runner.run([Classify(batch["tokens"], batch["extract_pos"], n)])[0]


def predict_file(path: str | Path, input_path: str | Path, out_path: str | Path, ctx: ParallelContext,
                 batch_size: int = 8) -> int:
    """Predictions for every example of ``input_path`` (labels optional) -> JSONL (rank 0
    writes); returns the number of examples. With labels present, the metrics are printed."""
    loaded, spec = load_classifier(path, ctx)
    tok = loaded.tokenizer
    spec = spec_for(spec, input_path, tok)
    examples, _ = read_task_file(input_path, spec, tok, require_labels=False)
    runner = Runner(loaded.model, ctx, loaded.cfg, task=loaded.task)
    rows = []
    for c in range(0, len(examples), batch_size):
        batch = collate([_with_valid_label(ex, spec) for ex in examples[c:c + batch_size]], tok.eod_id)
        rows.append(task_logits(runner, batch).double().numpy())
    logits = np.concatenate(rows)
    if ctx.rank != 0:
        return len(examples)
    atomic_write_text(out_path, "".join(json.dumps(r) + "\n" for r in prediction_rows(examples, logits, spec)))
    preds, _ = predictions(logits, spec)
    labels = np.array([ex.label for ex in examples])
    known = ~np.isnan(labels.astype(float)) if spec.regression else labels >= 0
    if known.all():
        metrics = compute_metrics(spec, preds, labels)
        print(" | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return len(examples)
