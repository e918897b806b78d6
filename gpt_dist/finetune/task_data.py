"""A fine-tuning run's task data and schedule, read and checked before any process group.

``load_task_data``: every task file validated and tokenized (or read from the cache), the
same on every rank, so a bad file fails all of them with one line naming FILE:LINE. The
schedule is derived from the data size (``FinetuneConfig.schedule``: steps = epochs x (train
examples // global batch), linear warmup over finetune.warmup_fraction of them, then linear
decay, GPT-1 §4.1); the config itself is never rewritten. The run itself is
``gpt_dist.finetune.session.finetune``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from gpt_dist.config import ConfigError, FinetuneConfig, ModelConfig
from gpt_dist.finetune.tasks import Example, TaskFileError, TaskSpec, TaskStats, load_task_cached
from gpt_dist.tokenizer import Tokenizer


def task_spec(ft: FinetuneConfig, model: ModelConfig, max_len: int) -> TaskSpec:
    """The task as the data layer needs it, from the ``finetune`` section (and, for multiple
    choice without ``finetune.num_choices``, the first example of the training file);
    ``max_len``: the run's ``Config.sequence_length``, at most ``model.n_ctx``."""
    if max_len > model.n_ctx:
        raise ConfigError(f"finetune.max_len: {max_len} exceeds model.n_ctx={model.n_ctx}")
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


def load_task_data(ft: FinetuneConfig, model: ModelConfig, max_len: int, run_dir: Path,
                   tok: Tokenizer) -> TaskData:
    """Every task file validated and tokenized (or read from the cache: ``finetune.cache_dir``,
    else ``run_dir/task_cache``) on this rank; ``model`` and ``max_len`` as in :func:`task_spec`.

    Every rank reads the same files with the same code, so a bad file fails on all of them
    with the same one-line error, before any collective could wait for a failed rank."""
    for key in ("train_file", "valid_file", "test_file"):
        path = getattr(ft, key)
        if key == "train_file" and not path:
            raise ConfigError("finetune.train_file: required")
        if path and not Path(path).is_file():
            raise ConfigError(f"finetune.{key}: {path} does not exist")
    spec = task_spec(ft, model, max_len)
    cache = Path(ft.cache_dir) if ft.cache_dir else run_dir / "task_cache"
    train, st_train = load_task_cached(ft.train_file, spec, tok, cache)
    stats = {"train": st_train}
    valid = test = None
    if ft.valid_file:
        valid, stats["valid"] = load_task_cached(ft.valid_file, spec, tok, cache)
    if ft.test_file:
        test, stats["test"] = load_task_cached(ft.test_file, spec, tok, cache, require_labels=False)
    return TaskData(spec, train, valid, test, stats)


