"""Task files (JSONL) and GPT-1's input transformations (Figure 1 of the paper).

Each example becomes token sequences that start with the *start* id and end with the
*extract* id, whose final state feeds the task head: classification ``{"text", "label"}``
-> ``[start] text [extract]``; entailment ``{"premise", "hypothesis", "label"}`` ->
``[start] premise [delim] hypothesis [extract]``; similarity ``{"text_a", "text_b",
"label" | "score"}`` -> both orderings ``[start] a [delim] b [extract]`` and ``[start] b
[delim] a [extract]`` (the paper adds the two extract states, so the head cannot depend on
the order); multiple choice ``{"context", "choices", "label"}`` -> one
``[start] context [delim] choice_i [extract]`` per choice.

The whole file is validated before training (a bad line found at step 40,000 wastes the
run); each problem is one line ``FILE:LINE: reason`` (:class:`TaskFileError`).

Truncation keeps every sequence within ``max_len`` with the extract id last (the head reads
position ``len - 1``). It cuts the task's *variable* text: the text (classification), the
premise (entailment), each text (similarity: the longer first, so both orderings hold the
same tokens), the context (multiple choice: cut to fit the longest choice, so every choice
is scored against the same context); the other text only once that one is gone.
``truncate="right"`` (default) cuts the end and keeps the start, as the GPT-1 reference
code (``x[:max_len]``) and Hugging Face tokenizers do, so results stay comparable with
theirs; ``"left"`` keeps the end, which suits continuation tasks (Story Cloze, RACE).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from gpt_dist.tokenizer import Tokenizer
from gpt_dist.utils import atomic_write_bytes

TaskType = Literal["classification", "entailment", "similarity", "multiple_choice"]
TASK_TYPES: tuple[str, ...] = get_args(TaskType)
NO_LABEL = -1  # label of an unlabelled class example (``require_labels=False``); regression: nan
CACHE_VERSION = 1
_CHUNK = 2048  # examples per encode_batch call: bounds the transient Python-int lists

# The text fields of each task type, in the order they enter the sequence.
FIELDS: dict[str, tuple[str, ...]] = {"classification": ("text",), "entailment": ("premise", "hypothesis"),
                                      "similarity": ("text_a", "text_b"), "multiple_choice": ("context", "choices")}


class TaskFileError(ValueError):
    """A task file cannot be used; ``str()`` is one line ``FILE:LINE: reason``."""

    def __init__(self, path: str | Path, line: int | None, reason: str) -> None:
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """What a task file means (keywords only: the order of the fields is not an API).

    ``num_labels``: classes; 1 means regression (similarity with ``"score"``); for multiple
    choice, the number of choices every example must have. ``label_names``: string label ->
    index (kept as a tuple so the spec is hashable; a list is accepted); int labels are
    accepted too. ``max_len``: the model context. ``truncate``: see the module docstring.
    """

    task: TaskType
    num_labels: int
    max_len: int
    label_names: tuple[str, ...] | None = None
    truncate: Literal["left", "right"] = "right"

    def __post_init__(self) -> None:
        if self.task not in TASK_TYPES:
            raise ValueError(f"task: unknown task type {self.task!r} (one of {', '.join(TASK_TYPES)})")
        if self.truncate not in ("left", "right"):
            raise ValueError(f"truncate: must be 'left' or 'right', got {self.truncate!r}")
        least = 1 if self.task == "similarity" else 2  # 1: regression, only for similarity
        if type(self.num_labels) is not int or self.num_labels < least:
            raise ValueError(f"num_labels: must be an int >= {least} for {self.task}, got {self.num_labels!r}")
        n_special = 2 if self.task == "classification" else 3
        if type(self.max_len) is not int or self.max_len <= n_special:
            raise ValueError(f"max_len: must be an int > {n_special} for {self.task}, got {self.max_len!r}")
        if self.label_names is not None:
            names = tuple(self.label_names)
            object.__setattr__(self, "label_names", names)
            if self.regression or not len({n for n in names if isinstance(n, str)}) == len(names) == self.num_labels:
                raise ValueError(f"label_names: must be num_labels ({self.num_labels}) distinct strings "
                                 f"(none for regression), got {list(names)}")

    @property
    def regression(self) -> bool:
        """Similarity with real-valued scores (one output, MSE-style head)."""
        return self.task == "similarity" and self.num_labels == 1

    @property
    def sequences_per_example(self) -> int:
        """K: 1 (classification, entailment), 2 (similarity), ``num_labels`` (multiple choice)."""
        return {"similarity": 2, "multiple_choice": self.num_labels}.get(self.task, 1)

    def settings(self) -> dict[str, Any]:
        """The fields that change the tokenized result (part of the cache key)."""
        return asdict(self)


@dataclass
class Example:
    """One task example. ``sequences``: K int32 arrays, start id first, extract id last
    (numpy, not lists of Python ints: RACE-sized tasks hold ~10^8 ids, gigabytes per rank
    as Python ints). ``label``: class index (int), score (float) for regression, or
    :data:`NO_LABEL` / nan when unlabelled. ``line``: 1-based line in the file."""

    sequences: list[np.ndarray]
    label: int | float
    line: int
    truncated: bool


@dataclass(frozen=True)
class TaskStats:
    """What was read: reported before training and used for the majority baseline."""

    path: str
    sha256: str
    n_examples: int
    n_truncated: int
    label_counts: dict[int, int] = field(default_factory=dict)  # every class, zeros included; {} for regression
    n_unlabelled: int = 0
    max_seq_len: int = 0  # longest sequence after truncation
    from_cache: bool = False


class _Bad(Exception):
    """A reason for one line; turned into a TaskFileError with the file and line."""


_JSON_TYPES = {str: "string", int: "number", float: "number", bool: "boolean", list: "array", dict: "object",
               type(None): "null"}


def _jtype(value: Any) -> str:
    return _JSON_TYPES.get(type(value), "value")


def _a(task: str) -> str:
    return f"{'an' if task[0] in 'aeiou' else 'a'} {task}"


def _parse(obj: Any, spec: TaskSpec, label_index: dict[str, int], require_labels: bool) -> tuple[list[str], int | float]:
    """The texts (in sequence order, choices last) and the label of one JSON line."""
    if not isinstance(obj, dict):
        raise _Bad(f"expected a JSON object, got {_jtype(obj)}")
    texts: list[str] = []
    for name in FIELDS[spec.task]:
        if name not in obj:
            msg = f'missing field "{name}" for {_a(spec.task)} task'
            looks = [t for t, f in FIELDS.items() if t != spec.task and all(k in obj for k in f)]
            if looks:
                msg += f"; the fields ({', '.join(sorted(obj))}) look like {_a(looks[0])} task"
            raise _Bad(msg)
        value = obj[name]
        if name != "choices":
            if not isinstance(value, str):
                raise _Bad(f'field "{name}" must be a string, got {_jtype(value)}')
            texts.append(value)
        elif not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise _Bad(f'field "choices" must be an array of strings, got {json.dumps(value)[:60]}')
        elif not value:
            raise _Bad('empty "choices"')
        elif len(value) != spec.num_labels:
            raise _Bad(f"ragged choices: {len(value)} choices, but every example must have num_labels = "
                       f"{spec.num_labels}")
        else:
            texts.extend(value)
    return texts, _parse_label(obj, spec, label_index, require_labels)


def _parse_label(obj: dict[str, Any], spec: TaskSpec, label_index: dict[str, int], require_labels: bool) -> int | float:
    if spec.regression:  # "score" as the issue names it; "label" too (GLUE's STS-B files use it)
        key = "score" if "score" in obj else "label"
        if key not in obj:
            if require_labels:
                raise _Bad('missing field "score" (a similarity task with num_labels 1 is a regression)')
            return math.nan
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _Bad(f'field "{key}" must be a finite number, got {json.dumps(value)[:40]}')
        return float(value)
    if "label" not in obj:
        if require_labels:
            hint = " (a score needs num_labels 1)" if "score" in obj and spec.task == "similarity" else ""
            raise _Bad(f'missing field "label"{hint}')
        return NO_LABEL
    value = obj["label"]
    n = spec.num_labels
    if isinstance(value, str):
        if not label_index:
            raise _Bad(f'string label "{value}" but the task has no label_names (use ints 0..{n - 1})')
        if value not in label_index:
            raise _Bad(f'unknown label "{value}" (known: {", ".join(label_index)})')
        return label_index[value]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f'field "label" must be an int or a string, got {_jtype(value)}')
    if not 0 <= value < n:
        known = f" ({', '.join(spec.label_names)})" if spec.label_names else ""
        raise _Bad(f"label {value} out of range 0..{n - 1}{known}")
    return value


def _cut(ids: list[int], n: int, side: str) -> list[int]:
    """``ids`` cut to at most ``n`` ids from ``side`` ("right": keep the start)."""
    return ids if len(ids) <= n else ids[:n] if side == "right" else ids[len(ids) - n:]


def _longest_first(la: int, lb: int, budget: int) -> tuple[int, int]:
    """Lengths that fit ``budget``: the longer text is cut first, then both equally (by the
    same count, so the rule is symmetric in the two texts and swapping them swaps the result:
    with an odd remainder one token of budget stays unused)."""
    over = la + lb - budget
    if over <= 0:
        return la, lb
    d = min(over, abs(la - lb))
    la, lb = (la - d, lb) if la > lb else (la, lb - d)
    cut = (over - d + 1) // 2
    return la - cut, lb - cut


def _sequences(ids: list[list[int]], spec: TaskSpec, start: int, delim: int, extract: int) -> tuple[list[np.ndarray], bool]:
    """Figure 1's transformation of one example's encoded texts, truncated to ``max_len``."""
    side, budget = spec.truncate, spec.max_len - 3

    def seq(first: list[int], second: list[int] | None = None) -> np.ndarray:
        middle = first if second is None else [*first, delim, *second]
        return np.asarray([start, *middle, extract], dtype=np.int32)

    if spec.task == "classification":
        text = _cut(ids[0], spec.max_len - 2, side)
        return [seq(text)], len(text) < len(ids[0])
    if spec.task == "entailment":
        hyp = _cut(ids[1], budget, side)
        prem = _cut(ids[0], budget - len(hyp), side)
        return [seq(prem, hyp)], len(hyp) + len(prem) < len(ids[0]) + len(ids[1])
    if spec.task == "similarity":
        na, nb = _longest_first(len(ids[0]), len(ids[1]), budget)
        a, b = _cut(ids[0], na, side), _cut(ids[1], nb, side)
        return [seq(a, b), seq(b, a)], na + nb < len(ids[0]) + len(ids[1])
    choices = [_cut(c, budget, side) for c in ids[1:]]
    ctx = _cut(ids[0], budget - max(len(c) for c in choices), side)
    cut = len(ctx) < len(ids[0]) or any(len(c) < len(o) for c, o in zip(choices, ids[1:]))
    return [seq(ctx, c) for c in choices], cut


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TaskFileError(path, None, f"cannot read the task file ({exc.strerror or exc})") from None


def read_task_file(path: str | Path, spec: TaskSpec, tokenizer: Tokenizer, *,
                   require_labels: bool = True) -> tuple[list[Example], TaskStats]:
    """Validate, tokenize and transform a JSONL task file (blank lines are skipped).

    ``require_labels=False`` reads prediction inputs: a missing label becomes
    :data:`NO_LABEL` (nan for regression); a label that is present is still checked.
    Raises :class:`TaskFileError` on the first bad line.
    """
    path = Path(path)
    data = _read_bytes(path)
    label_index = {n: i for i, n in enumerate(spec.label_names or ())}
    records: list[tuple[int, list[str], int | float]] = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
            records.append((n, *_parse(obj, spec, label_index, require_labels)))
        except UnicodeDecodeError as exc:
            raise TaskFileError(path, n, f"not UTF-8 text (byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise TaskFileError(path, n, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
        except _Bad as exc:
            raise TaskFileError(path, n, str(exc)) from None
    if not records:
        raise TaskFileError(path, 1, "empty task file (no examples)")
    ids = (tokenizer.start_id, tokenizer.delimiter_id, tokenizer.extract_id)
    examples: list[Example] = []
    for c in range(0, len(records), _CHUNK):
        chunk = records[c:c + _CHUNK]
        encoded = tokenizer.encode_batch([t for _, texts, _ in chunk for t in texts])
        pos = 0
        for line, texts, label in chunk:
            seqs, cut = _sequences(encoded[pos:pos + len(texts)], spec, *ids)
            pos += len(texts)
            examples.append(Example(seqs, label, line, cut))
    return examples, _stats(path, hashlib.sha256(data).hexdigest(), examples, spec)


def _stats(path: Path, sha: str, examples: list[Example], spec: TaskSpec, from_cache: bool = False) -> TaskStats:
    if spec.regression:
        counts, unlabelled = {}, sum(math.isnan(ex.label) for ex in examples)
    else:
        seen = Counter(ex.label for ex in examples)
        counts, unlabelled = {c: seen.get(c, 0) for c in range(spec.num_labels)}, seen.get(NO_LABEL, 0)
    return TaskStats(str(path), sha, len(examples), sum(ex.truncated for ex in examples), counts, unlabelled,
                     max(len(s) for ex in examples for s in ex.sequences), from_cache)


# ---- the token cache ---------------------------------------------------------------------

def _arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode() + b":" + np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


def _to_npz(key: str, examples: list[Example]) -> bytes:
    seqs = [s for ex in examples for s in ex.sequences]
    arrays = {"tokens": np.concatenate(seqs).astype(np.int32),
              "seq_lens": np.asarray([len(s) for s in seqs], dtype=np.int64),
              "labels": np.asarray([float(ex.label) for ex in examples], dtype=np.float64),
              "lines": np.asarray([ex.line for ex in examples], dtype=np.int64),
              "truncated": np.asarray([ex.truncated for ex in examples], dtype=np.bool_)}
    meta = {"version": CACHE_VERSION, "key": key, "digest": _arrays_digest(arrays)}
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    return buf.getvalue()


def _from_npz(file: Path, key: str, spec: TaskSpec, vocab_size: int) -> list[Example] | None:
    """The cached examples, or None when the file is absent, corrupt or for another key."""
    try:
        with np.load(file, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            arrays = {k: z[k] for k in ("tokens", "seq_lens", "labels", "lines", "truncated")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError):
        return None
    tokens, lens = arrays["tokens"], arrays["seq_lens"]
    n, k = len(arrays["labels"]), spec.sequences_per_example
    if (not isinstance(meta, dict) or meta.get("key") != key or meta.get("digest") != _arrays_digest(arrays)
            or tokens.dtype != np.int32 or tokens.ndim != 1 or lens.shape != (n * k,) or n == 0
            or lens.min() < 2 or int(lens.sum()) != len(tokens) or tokens.min() < 0 or tokens.max() >= vocab_size):
        return None
    offsets = np.concatenate([[0], np.cumsum(lens)])
    seqs = [tokens[offsets[i]:offsets[i + 1]] for i in range(n * k)]
    as_label = float if spec.regression else int
    return [Example(seqs[i * k:(i + 1) * k], as_label(arrays["labels"][i]), int(arrays["lines"][i]),
                    bool(arrays["truncated"][i])) for i in range(n)]


def load_task_cached(path: str | Path, spec: TaskSpec, tokenizer: Tokenizer, cache_dir: str | Path, *,
                     require_labels: bool = True) -> tuple[list[Example], TaskStats]:
    """:func:`read_task_file`, tokenized once: later calls with the same file content,
    tokenizer and spec read ``cache_dir/<name>.<key>.npz`` (``stats.from_cache`` is True).

    The cache is checked, not trusted: a file that does not parse, is for another key or
    whose arrays do not match their recorded digest is ignored and rebuilt.
    """
    path, cache_dir = Path(path), Path(cache_dir)
    sha = hashlib.sha256(_read_bytes(path)).hexdigest()
    blob = {"version": CACHE_VERSION, "file": sha, "tokenizer": tokenizer.fingerprint, "spec": spec.settings(),
            "require_labels": require_labels}  # everything the tokenized result depends on
    key = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()
    file = cache_dir / f"{path.name}.{key[:24]}.npz"
    cached = _from_npz(file, key, spec, tokenizer.vocab_size)
    if cached is not None:
        return cached, _stats(path, sha, cached, spec, from_cache=True)
    examples, stats = read_task_file(path, spec, tokenizer, require_labels=require_labels)
    try:
        if stats.sha256 == sha:  # else the file changed between the two reads: cache nothing
            cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(file, _to_npz(key, examples))  # ranks may write it at once: atomic_path
    except OSError as exc:
        raise TaskFileError(file, None, f"cannot write the token cache ({exc.strerror or exc})") from None
    return examples, stats

