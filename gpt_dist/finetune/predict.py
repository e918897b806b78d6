"""Run a fine-tuned export on new examples: ``launch/predict.py``.

The export (native; or a Hugging Face DoubleHeads directory for multiple choice) carries the
model, W_y, the tokenizer and the fine-tuning config, so the input file is read with exactly
the transformations and truncation the model was trained with. One process runs the whole
model; under torchrun with N processes it is split N ways (tensor parallel), as generation is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt_dist.finetune.tasks import TaskSpec


def load_classifier(export_dir: str | Path, device: str = "cpu") -> tuple[Any, TaskSpec, Any]:
    """(model with its task head, the task spec, the tokenizer) of a fine-tuned export."""
    from gpt_dist.config import config_from_dict
    from gpt_dist.export import ExportError, load_export, load_state_into_model
    from gpt_dist.finetune.task_data import task_spec
    from gpt_dist.generate import _ensure_parallel_state
    from gpt_dist.model.gpt import GPT, ModelSpec
    from gpt_dist.model.heads import TaskHeadSpec
    from gpt_dist.tokenizer import load_tokenizer

    export_dir = Path(export_dir)
    mcfg, state, task = load_export(export_dir)
    if task is None:
        raise ExportError(f"{export_dir}: not a fine-tuned export (no task head); export a finetune run")
    conf = json.loads((export_dir / "config.json").read_text())
    tok = load_tokenizer(export_dir)
    training = conf.get("training_config") or {}
    if training.get("finetune"):
        cfg = config_from_dict({**training, "checkpoint": {**training.get("checkpoint", {}), "init_from": None}})
    else:  # a Hugging Face DoubleHeads directory: multiple choice, the model's context
        cfg = config_from_dict({"model": {k: getattr(mcfg, k) for k in ("arch", "n_layer", "n_head", "n_embd",
                                                                         "n_ctx", "vocab_size")},
                                "finetune": {"task": "multiple_choice", "train_file": ""}})
    spec = task_spec(cfg, tok) if task["task"] != "multiple_choice" else None
    tp, tp_rank = _ensure_parallel_state(device)
    head = TaskHeadSpec(task["task"], int(task["n_out"]), float(task.get("dropout", 0.1)),
                        float(task.get("lm_coef", 0.5)))
    model = GPT(ModelSpec(mcfg, tp=tp, task=head))
    load_state_into_model(model, state, tp_rank, tp, mcfg)
    model = model.to(device).eval()
    return model, spec or cfg, tok


def predict_file(export_dir: str | Path, input_path: str | Path, out_path: str | Path,
                 batch_size: int = 8, device: str = "cpu") -> int:
    """Predictions for every example of ``input_path`` (labels optional) -> JSONL; returns
    the number of examples. With labels present, the accuracy/metrics are printed too."""
    from gpt_dist.finetune.batches import collate
    from gpt_dist.finetune.objective import _with_valid_label, prediction_rows, predictions
    from gpt_dist.finetune.task_data import task_spec
    from gpt_dist.finetune.tasks import read_task_file
    from gpt_dist.utils import atomic_write_text

    model, spec, tok = load_classifier(export_dir, device)
    if not isinstance(spec, TaskSpec):  # multiple choice: the number of choices of this file
        import dataclasses

        cfg = spec
        cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, train_file=str(input_path),
                                                                    num_choices=None))
        spec = task_spec(cfg, tok)
    examples, _ = read_task_file(input_path, spec, tok, require_labels=False)
    rows = []
    with torch.no_grad():
        for c in range(0, len(examples), batch_size):
            chunk = [_with_valid_label(ex, spec) for ex in examples[c:c + batch_size]]
            b = {k: v.to(device) for k, v in collate(chunk, tok.eod_id).items()}
            _, _, logits = model(b["tokens"], b["lm_labels"], b["lm_mask"], None, b["extract_pos"],
                                 b["task_labels"])
            rows.append(logits.double().cpu().numpy())
    logits = np.concatenate(rows)
    atomic_write_text(out_path, "".join(json.dumps(r) + "\n" for r in prediction_rows(examples, logits, spec)))
    preds, _ = predictions(logits, spec)
    labels = np.array([ex.label for ex in examples])
    known = ~np.isnan(labels.astype(float)) if spec.regression else labels >= 0
    if known.all():
        from gpt_dist.finetune.metrics import compute_metrics

        metrics = compute_metrics(spec, preds, labels)
        print(" | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return len(examples)



