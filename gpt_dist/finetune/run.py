"""``finetune(cfg)``: everything ``launch/finetune.py`` does after parsing.

    read + validate the task files (cached tokens)  -> one-line errors before any process group
    derive the schedule (``FinetuneConfig.schedule``): steps = epochs x (train examples //
        global batch); linear warmup over finetune.warmup_fraction of them, then linear decay
        (GPT-1 §4.1); the config itself is never rewritten
    context -> engine (the pretraining model plus W_y, any TP/PP/ZeRO layout)
        -> checkpoint.init_from (an export, native or HF, vocabulary grown; or a run directory)
        -> resume (exact, mid-epoch) -> the shared training loop with ``TaskObjective``
    validation every epoch (and every finetune.eval_interval steps); the best checkpoint by
    finetune.metric is exported to RUN_DIR/best; test predictions -> RUN_DIR/test_predictions.jsonl;
    results table -> console, RUN_DIR/results.json, TensorBoard.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from gpt_dist.config import Config, ConfigError, validate
from gpt_dist.finetune.tasks import Example, TaskSpec, TaskStats, load_task_cached
from gpt_dist.tokenizer import Tokenizer


def task_spec(cfg: Config, tok: Tokenizer) -> TaskSpec:
    """The task as the data layer needs it, from the config (and, for multiple choice without
    ``finetune.num_choices``, the first example of the training file)."""
    ft = cfg.finetune
    assert ft is not None
    max_len = cfg.sequence_length
    if max_len > cfg.model.n_ctx:
        raise ConfigError(f"finetune.max_len: {max_len} exceeds model.n_ctx={cfg.model.n_ctx}")
    if ft.task == "multiple_choice":
        num_labels = ft.num_choices or _first_choices(Path(ft.train_file))
    else:
        num_labels = 1 if ft.regression else ft.classes()
    try:
        return TaskSpec(task=ft.task, num_labels=num_labels, max_len=max_len,
                        label_names=tuple(ft.label_names) if ft.label_names else None, truncate=ft.truncate)
    except ValueError as exc:
        raise ConfigError(f"finetune: {exc}") from None


def _first_choices(path: Path) -> int:
    from gpt_dist.finetune.tasks import TaskFileError

    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    choices = json.loads(line).get("choices")
                    if not isinstance(choices, list) or len(choices) < 2:
                        raise TaskFileError(path, n, "multiple_choice needs a list of at least 2 \"choices\"")
                    return len(choices)
    except (OSError, ValueError, AttributeError) as exc:
        raise TaskFileError(path, None, f"cannot read the number of choices ({exc})") from None
    raise TaskFileError(path, 1, "empty task file (no examples)")


@dataclasses.dataclass
class TaskData:
    spec: TaskSpec
    train: list[Example]
    valid: list[Example] | None
    test: list[Example] | None
    stats: dict[str, TaskStats]


def load_task_data(cfg: Config, tok: Tokenizer) -> TaskData:
    """Every task file validated and tokenized (or read from the cache) on this rank.

    Every rank reads the same files with the same code, so a bad file fails on all of them
    with the same one-line error, before any collective could wait for a failed rank."""
    ft = cfg.finetune
    assert ft is not None
    for key in ("train_file", "valid_file", "test_file"):
        path = getattr(ft, key)
        if key == "train_file" and not path:
            raise ConfigError("finetune.train_file: required")
        if path and not Path(path).is_file():
            raise ConfigError(f"finetune.{key}: {path} does not exist")
    spec = task_spec(cfg, tok)
    cache = Path(ft.cache_dir) if ft.cache_dir else cfg.run_dir / "task_cache"
    train, st_train = load_task_cached(ft.train_file, spec, tok, cache)
    stats = {"train": st_train}
    valid = test = None
    if ft.valid_file:
        valid, stats["valid"] = load_task_cached(ft.valid_file, spec, tok, cache)
    if ft.test_file:
        test, stats["test"] = load_task_cached(ft.test_file, spec, tok, cache, require_labels=False)
    return TaskData(spec, train, valid, test, stats)


def finetune(cfg: Config, ctx: Any = None, hooks: Any = None) -> Any:
    """Fine-tune; returns the final ``TrainState``. See the module docstring."""
    from gpt_dist.finetune.driver import run

    if cfg.finetune is None:
        raise ConfigError("finetune: the config has no finetune section (use launch/pretrain.py to pretrain)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world)  # the sequence length is the task's (Config.sequence_length)
    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer: fine-tuning needs the tokenizer (its start/delimiter/extract ids)")
    from gpt_dist.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} < tokenizer vocabulary {tok.vocab_size} "
                          f"({cfg.data.tokenizer}); set it to {tok.vocab_size}")
    data = load_task_data(cfg, tok)
    schedule = cfg.run_schedule(len(data.train))  # derived; the config is never rewritten
    return run(cfg, tok, data, schedule, ctx, hooks)
