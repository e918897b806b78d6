"""``finetune(cfg)``: everything ``launch/finetune.py`` does after parsing.

    read + validate the task files (cached tokens)  -> one-line errors before any process group
    derive the schedule (``FinetuneConfig.schedule``): epochs -> steps, GPT-1's warmup/decay;
        the config itself is never rewritten
    training session (training/session.py): context -> engine (the pretraining model plus W_y,
        any TP/PP/ZeRO layout) -> checkpoint.init_from (an export, native or HF, vocabulary
        grown; or a run directory) -> resume (exact, mid-epoch) -> the loop with ``TaskObjective``
    validation every epoch (and every finetune.eval_interval steps); the best checkpoint by
    finetune.metric is exported to RUN_DIR/best; with the best model, test predictions ->
    RUN_DIR/test_predictions.jsonl; results table -> console, RUN_DIR/results.json, TensorBoard.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from gpt_dist import deepspeed_compat
from gpt_dist.config import Config, ConfigError, Schedule, validate
from gpt_dist.export.writer import export_checkpoint
from gpt_dist.finetune.metrics import majority_baseline
from gpt_dist.finetune.objective import TaskObjective, prediction_rows
from gpt_dist.finetune.task_data import TaskData, load_task_data
from gpt_dist.parallel import ParallelContext
from gpt_dist.tokenizer import Tokenizer, load_tokenizer
from gpt_dist.training.engine import Engine
from gpt_dist.training.hooks import TrainHooks
from gpt_dist.training.init_from import load_into_engine
from gpt_dist.training.loop import TrainState
from gpt_dist.training.metrics import RunLogger
from gpt_dist.training.session import Session, training_session
from gpt_dist.utils import atomic_write_text

BEST_DIR = "best"
RESULTS = "results.json"
PREDICTIONS = "test_predictions.jsonl"


class BestTracker:
    """Keeps the best validation value of ``finetune.metric`` (higher is better for every
    metric the tasks report). Its state travels in the checkpoint's train state, so a
    resumed run still knows which step was best."""

    def __init__(self, metric: str, state: TrainState) -> None:
        self.metric, self.state = metric, state

    def on_eval(self, step: int, metrics: dict[str, float]) -> bool:
        """True when ``step`` is a new best: the loop then saves a checkpoint at this step."""
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        best = self.state.best
        if best is None or value > best["value"]:
            self.state.best = {"step": step, "metric": self.metric, "value": value, "metrics": metrics}
            return True
        return False


def finetune(cfg: Config, ctx: ParallelContext | None = None, hooks: TrainHooks | None = None) -> TrainState:
    """Fine-tune; returns the final ``TrainState``. See the module docstring.

    ``ctx``: an existing parallel context (else one is built from the launcher's environment
    and destroyed at the end); ``hooks``: see ``gpt_dist.training.hooks`` (default: none)."""
    if cfg.finetune is None:
        raise ConfigError("finetune: the config has no finetune section (use launch/pretrain.py to pretrain)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world)  # the sequence length is the task's (Config.sequence_length)
    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer: fine-tuning needs the tokenizer (its start/delimiter/extract ids)")
    tok = load_tokenizer(cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} < tokenizer vocabulary {tok.vocab_size} "
                          f"({cfg.data.tokenizer}); set it to {tok.vocab_size}")
    data = load_task_data(cfg.finetune, cfg.model, cfg.sequence_length, cfg.run_dir, tok)
    schedule = cfg.run_schedule(len(data.train))  # derived; the config is never rewritten
    return train(cfg, tok, data, schedule, ctx, hooks)


def train(cfg: Config, tok: Tokenizer, data: TaskData, schedule: Schedule, ctx: ParallelContext | None = None,
          hooks: TrainHooks | None = None) -> TrainState:
    """The training session with ``TaskObjective``, the best model kept, then predictions."""
    ft = cfg.finetune
    assert ft is not None
    with training_session(cfg, tok.fingerprint, ctx, hooks, schedule) as s:
        _report_data(s.log, data)
        eng = s.start()
        pipe_loss = deepspeed_compat.pipeline_loss_fn(eng.ds.module) if eng.is_pipeline else None
        objective = TaskObjective(cfg, s.ctx, data.spec, data.train, data.valid, pad_id=tok.eod_id,
                                  pipe_loss=pipe_loss)
        tracker = BestTracker(ft.selection_metric(), s.state)
        state = s.train(objective, on_eval=tracker.on_eval, on_saved=functools.partial(_export_best, s, tracker))
        if not s.finished:
            return state  # preempted: the requeued job finishes (predictions, results)
        s.log.results(_finish(cfg, s.ctx, eng, objective, data, state))
    return state


def _export_best(s: Session, tracker: BestTracker, step: int, tag_dir: Path | None) -> None:
    """After each save (every rank): a save at the best step is exported to RUN_DIR/best."""
    best = tracker.state.best
    if s.ctx.is_main and tag_dir is not None and best is not None and best["step"] == step:
        export_checkpoint(s.cfg.run_dir, s.cfg.run_dir / BEST_DIR, step=step)
        s.log.write(f"best {best['metric']} {best['value']:.4f} at step {step}: exported to "
                    f"{s.cfg.run_dir / BEST_DIR}")
    s.ctx.barrier()


def _report_data(log: RunLogger, data: TaskData) -> None:
    for split, st in data.stats.items():
        log.write(f"{split}: {st.path} | {st.n_examples} examples | {st.n_truncated} truncated to "
                  f"{data.spec.max_len} tokens ({'cached' if st.from_cache else 'tokenized'})")


def _finish(cfg: Config, ctx: ParallelContext, eng: Engine, objective: TaskObjective, data: TaskData,
            state: TrainState) -> dict[str, Any]:
    """With the best model (when validation chose one): validation, test predictions, table."""
    best = state.best
    best_dir = cfg.run_dir / BEST_DIR
    if best is not None and best["step"] != state.step and best_dir.is_dir():
        load_into_engine(best_dir, eng, cfg, ctx)
    spec = data.spec
    out: dict[str, Any] = {"task": spec.task, "run": str(cfg.run_dir), "final_step": state.step,
                           "init_from": cfg.checkpoint.init_from,
                           "best": best, "examples": {k: v.n_examples for k, v in data.stats.items()},
                           "truncated": {k: v.n_truncated for k, v in data.stats.items()}}
    if data.valid:
        out["valid"] = objective.evaluate(eng, state.step)
        labels = np.array([ex.label for ex in data.valid])
        out["majority_baseline"] = majority_baseline(data.stats["train"].label_counts, spec, labels)
    if data.test:
        logits, _ = objective.predict(eng, data.test)
        if ctx.is_main:
            _write_predictions(cfg.run_dir / PREDICTIONS, data, logits)
        out["test_predictions"] = str(cfg.run_dir / PREDICTIONS)
        labelled = [ex for ex in data.test if _labelled(ex.label, spec.regression)]
        if len(labelled) == len(data.test):
            out["test"] = objective.task_metrics(logits, data.test)
    if ctx.is_main:
        atomic_write_text(cfg.run_dir / RESULTS, json.dumps(out, indent=2) + "\n")
    return out


def _labelled(label: Any, regression: bool) -> bool:
    return not math.isnan(label) if regression else label >= 0


def _write_predictions(path: Path, data: TaskData, logits: np.ndarray) -> None:
    """One JSON line per test example (``objective.prediction_rows``), written atomically."""
    rows = prediction_rows(data.test or [], logits, data.spec)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
