"""The parallel part of fine-tuning: engine, initialisation, the shared loop, best model,
predictions and the results table (``run.finetune`` prepares the config and the data)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from gpt_dist.config import Config, Schedule
from gpt_dist.finetune.metrics import majority_baseline
from gpt_dist.finetune.objective import TaskObjective, prediction_rows
from gpt_dist.finetune.run import TaskData
from gpt_dist.tokenizer import Tokenizer
from gpt_dist.utils import atomic_write_text

BEST_DIR = "best"
RESULTS = "results.json"
PREDICTIONS = "test_predictions.jsonl"


class BestTracker:
    """Keeps the best validation value of ``finetune.metric`` (higher is better for every
    metric the tasks report). Its state travels in the checkpoint's train state, so a
    resumed run still knows which step was best."""

    def __init__(self, metric: str, state: Any) -> None:
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


def _pipe_loss(eng: Any) -> Any:
    return getattr(eng.ds.module, "loss_fn", None) if eng.is_pipeline else None


def run(cfg: Config, tok: Tokenizer, data: TaskData, schedule: Schedule, ctx: Any = None, hooks: Any = None) -> Any:
    from gpt_dist.export import export_checkpoint, load_into_engine
    from gpt_dist.training.engine import build_engine
    from gpt_dist.training.hooks import NO_HOOKS
    from gpt_dist.training.loop import TrainState, resume, start_step, train_loop, training_session

    hooks = hooks or NO_HOOKS
    ft = cfg.finetune
    assert ft is not None
    with training_session(cfg, ctx, tok.fingerprint, schedule) as (pc, log, stop):
        ctx = pc
        _report_data(log, data)
        eng = build_engine(cfg, ctx, schedule=schedule)
        if cfg.checkpoint.init_from:
            load_into_engine(cfg.checkpoint.init_from, eng, cfg, ctx)
            log.write(f"initialised from {cfg.checkpoint.init_from}")
        objective = TaskObjective(cfg, ctx, data.spec, data.train, data.valid, pad_id=tok.eod_id,
                                  pipe_loss=_pipe_loss(eng))
        state = resume(cfg, ctx, eng, TrainState(), log, hooks)
        tracker = BestTracker(ft.selection_metric(), state)
        start_step(log, state)

        def on_saved(step: int, tag_dir: Path | None) -> None:
            best = tracker.state.best
            if ctx.is_main and tag_dir is not None and best is not None and best["step"] == step:
                export_checkpoint(cfg.run_dir, cfg.run_dir / BEST_DIR, step=step)
                log.write(f"best {best['metric']} {best['value']:.4f} at step {step}: exported to "
                          f"{cfg.run_dir / BEST_DIR}")
            ctx.barrier()

        state = train_loop(cfg, ctx, eng, objective, state, tok.fingerprint, log, stop, hooks,
                           on_eval=tracker.on_eval, on_saved=on_saved, schedule=schedule)
        tracker.state = state
        if stop.signum or state.step < schedule.train_steps:
            return state  # preempted: the requeued job finishes (predictions, results)
        results = _finish(cfg, ctx, eng, objective, data, state, log)
        log.results(results)
    return state


def _report_data(log: Any, data: TaskData) -> None:
    for split, st in data.stats.items():
        log.write(f"{split}: {st.path} | {st.n_examples} examples | {st.n_truncated} truncated to "
                  f"{data.spec.max_len} tokens ({'cached' if st.from_cache else 'tokenized'})")


def _finish(cfg: Config, ctx: Any, eng: Any, objective: TaskObjective, data: TaskData, state: Any,
            log: Any) -> dict[str, Any]:
    """With the best model (when validation chose one): validation, test predictions, table."""
    from gpt_dist.export import load_into_engine

    best = state.best
    best_dir = cfg.run_dir / "best"
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
            _write_predictions(cfg.run_dir / PREDICTIONS, data, logits, cfg)
        out["test_predictions"] = str(cfg.run_dir / PREDICTIONS)
        labelled = [ex for ex in data.test if _labelled(ex.label, spec.regression)]
        if len(labelled) == len(data.test):
            out["test"] = objective.task_metrics(logits, data.test)
    if ctx.is_main:
        atomic_write_text(cfg.run_dir / RESULTS, json.dumps(out, indent=2) + "\n")
    return out


def _labelled(label: Any, regression: bool) -> bool:
    return not math.isnan(label) if regression else label >= 0


def _write_predictions(path: Path, data: TaskData, logits: np.ndarray, cfg: Config) -> None:
    """One JSON line per test example (``objective.prediction_rows``), written atomically."""
    rows = prediction_rows(data.test or [], logits, data.spec)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
