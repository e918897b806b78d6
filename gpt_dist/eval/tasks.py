"""Built-in zero-shot tasks on local JSONL files, with lm-evaluation-harness's definitions.

Three kinds (``PAPERS_AND_NUMBERS.md`` quotes lm-eval's definitions):

* ``lambada`` (``{"text"}``, the OpenAI LAMBADA jsonl): context = the words before the last
  space, continuation = ``" " + last word`` (``lambada_openai.yaml``). ``acc`` = mean of
  "every token of the target is the greedy token"; ``perplexity`` = exp(-mean over examples
  of the target's summed log-likelihood), a per-word perplexity.
* ``rolling`` (``{"page"}`` or ``{"text"}``, one document a line): ``loglikelihood_rolling``
  over the whole document; ``word_perplexity`` (words = ``re.split(r"\\s+")`` of the original
  text), ``byte_perplexity`` and ``bits_per_byte`` (UTF-8 bytes of the original text), and
  ``token_perplexity`` (per token of this tokenizer). ``wikitext*`` tasks score lm-eval's
  ``wikitext_detokenizer`` of the page, counting words and bytes on the page as written.
* ``mc`` (``{"context", "choices", "label"}``): each choice scored as ``" " + choice`` after
  the context; ``acc`` = argmax of the log-likelihoods is the label, ``acc_norm`` = argmax
  of log-likelihood / character length of the choice.

Task names: ``lambada`` (``lambada_openai``, ``lambada_standard``), ``wikitext``
(``wikitext103``), ``ptb``, ``enwik8``, ``text8``, and multiple choice ``hellaswag``,
``piqa``, ``arc_easy``, ``arc_challenge``, ``storycloze``, ``cbt_cn``, ``cbt_ne``,
``openbookqa``: read from ``DATA_DIR/NAME.jsonl``. For HellaSwag, PIQA and ARC the public
release's rows are accepted as they are and converted with lm-eval's prompts
(``gpt_dist/eval/convert.py``). Any other file: ``KIND:PATH`` (``mc:evals/mine.jsonl``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt_dist.eval import metrics as M
from gpt_dist.eval.convert import CONVERTERS, wikitext_detokenizer
from gpt_dist.eval.model import EvalError
from gpt_dist.eval.scoring import encode_pair

KINDS = ("lambada", "rolling", "mc")
KNOWN: dict[str, tuple[str, tuple[str, ...]]] = {
    "lambada": ("lambada", ("lambada.jsonl", "lambada_openai.jsonl", "lambada_test.jsonl")),
    "lambada_openai": ("lambada", ("lambada_openai.jsonl", "lambada.jsonl", "lambada_test.jsonl")),
    "lambada_standard": ("lambada", ("lambada_standard.jsonl",)),
    "wikitext": ("rolling", ("wikitext.jsonl", "wikitext2.jsonl", "wikitext_test.jsonl")),
    "wikitext103": ("rolling", ("wikitext103.jsonl",)),
    "ptb": ("rolling", ("ptb.jsonl",)),
    "enwik8": ("rolling", ("enwik8.jsonl",)),
    "text8": ("rolling", ("text8.jsonl",)),
    **{n: ("mc", (f"{n}.jsonl",)) for n in ("hellaswag", "piqa", "arc_easy", "arc_challenge", "storycloze",
                                            "cbt_cn", "cbt_ne", "openbookqa")},
}


@dataclass
class Task:
    name: str
    kind: str
    path: Path
    docs: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    sha256: str = ""
    detokenize: Callable[[str], str] | None = None

    def texts(self, i: int) -> list[str]:
        """The example's text pieces (for the training-data overlap check)."""
        d = self.docs[i]
        if self.kind == "mc":
            return [d["context"], *d["choices"]]
        return [d["text"]]


def known_tasks() -> str:
    return ", ".join(sorted(KNOWN)) + f", or KIND:PATH with KIND in {'/'.join(KINDS)}"


def resolve(names: str, data_dir: str | Path | None) -> list[Task]:
    """``--tasks a,b,KIND:PATH`` -> tasks (files not read yet)."""
    out = []
    for raw in [n.strip() for n in names.split(",") if n.strip()]:
        kind, _, rest = raw.partition(":")
        if rest and kind in KINDS:
            path = Path(rest)
            if not path.is_file():
                raise EvalError(f"--tasks {raw}: {path}: no such file")
            out.append(Task(path.stem, kind, path))
            continue
        if raw not in KNOWN:
            raise EvalError(f"--tasks: unknown task {raw!r}; known: {known_tasks()}")
        kind, files = KNOWN[raw]
        if data_dir is None:
            raise EvalError(f"--tasks {raw}: needs --data-dir (a folder holding {files[0]})")
        found = [Path(data_dir) / f for f in files if (Path(data_dir) / f).is_file()]
        if not found:
            raise EvalError(f"--tasks {raw}: {Path(data_dir) / files[0]} not found (docs/eval.md says how to "
                            "get and convert the public release)")
        task = Task(raw, kind, found[0])
        if raw.startswith("wikitext"):
            task.detokenize = wikitext_detokenizer
        out.append(task)
    if not out:
        raise EvalError("--tasks: no task given; known: " + known_tasks())
    return out


def _str(d: dict[str, Any], key: str, where: str) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise EvalError(f"{where}: field {key!r} missing or not a string")
    return v


def _row(task: Task, d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise EvalError(f"{where}: not a JSON object")
    if task.kind == "lambada":
        text = _str(d, "text", where)
        if " " not in text.strip():
            raise EvalError(f"{where}: 'text' has no space: no context/last-word split")
        return {"text": text}
    if task.kind == "rolling":
        key = "page" if "page" in d else "text"
        return {"text": _str(d, key, where)}
    conv = CONVERTERS.get(task.name)
    if conv is not None and "context" not in d:
        try:
            d = conv(d)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EvalError(f"{where}: not a {task.name} row ({type(exc).__name__}: {exc})") from None
    ctx = _str(d, "context", where)
    choices = d.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise EvalError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
    label = d.get("label")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise EvalError(f"{where}: 'label' must be an integer in [0, {len(choices)}), got {label!r}")
    return {"context": ctx, "choices": choices, "label": label}


def read(task: Task, limit: int | None = None) -> Task:
    """Parse and check the task file (errors: ``FILE:LINE: reason``); hashes its bytes."""
    try:
        raw = task.path.read_bytes()
    except OSError as exc:
        raise EvalError(f"{task.path}: unreadable ({exc.strerror})") from None
    task.sha256 = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise EvalError(f"{task.path}:{line}: not UTF-8") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{task.path}:{n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalError(f"{where}: invalid JSON ({exc.msg})") from None
        task.docs.append(_row(task, d, where))
        task.lines.append(n)
        if limit is not None and len(task.docs) >= limit:
            break
    if not task.docs:
        raise EvalError(f"{task.path}: no examples")
    return task


# --------------------------------------------------------------------------- scoring


def score(task: Task, scorer: Any, tok: Any, rolling_context: int = 1) -> dict[str, list[Any]]:
    """Per-example raw results of ``task`` (what ``compute_metrics`` aggregates)."""
    prefix = scorer.em.prefix_id
    if task.kind == "lambada":
        pairs = [encode_pair(tok, " ".join(d["text"].split(" ")[:-1]), " " + d["text"].split(" ")[-1], prefix)
                 for d in task.docs]
        res = scorer.loglikelihood(pairs, desc=task.name)
        return {"ll": [r[0] for r in res], "greedy": [r[1] for r in res]}
    if task.kind == "rolling":
        scored = [task.detokenize(d["text"]) if task.detokenize else d["text"] for d in task.docs]
        toks = tok.encode_batch(scored) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in scored]
        lls = scorer.loglikelihood_rolling(toks, rolling_context, desc=task.name)
        return {"ll": lls, "tokens": [len(t) for t in toks],
                "words": [len(re.split(r"\s+", d["text"])) for d in task.docs],
                "bytes": [len(d["text"].encode("utf-8")) for d in task.docs]}
    pairs, owner = [], []
    for i, d in enumerate(task.docs):
        for c in d["choices"]:
            pairs.append(encode_pair(tok, d["context"], " " + c, prefix))
            owner.append(i)
    res = scorer.loglikelihood(pairs, desc=task.name)
    lls: list[list[float]] = [[] for _ in task.docs]
    for i, (ll, _) in zip(owner, res, strict=True):
        lls[i].append(ll)
    return {"lls": lls, "label": [d["label"] for d in task.docs],
            "lens": [[float(len(c)) for c in d["choices"]] for d in task.docs]}


def _argmax(xs: list[float]) -> int:
    """numpy.argmax semantics (first maximum), as lm-eval uses."""
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def per_example(task: Task, raw: dict[str, list[Any]]) -> dict[str, list[float]]:
    """Per-example metric values (acc, acc_norm) where the metric is a mean."""
    if task.kind == "lambada":
        return {"acc": [float(g) for g in raw["greedy"]]}
    if task.kind == "mc":
        acc = [float(_argmax(ll) == lab) for ll, lab in zip(raw["lls"], raw["label"], strict=True)]
        norm = [float(_argmax([x / n for x, n in zip(ll, ln, strict=True)]) == lab)
                for ll, ln, lab in zip(raw["lls"], raw["lens"], raw["label"], strict=True)]
        return {"acc": acc, "acc_norm": norm}
    return {}


def compute_metrics(task: Task, raw: dict[str, list[Any]], keep: list[bool] | None = None,
                    bootstrap_iters: int = 100_000) -> dict[str, dict[str, float | None]]:
    """{metric: {"value", "stderr"}} over the examples (or those with ``keep`` True)."""
    idx = [i for i in range(len(task.docs)) if keep is None or keep[i]]
    out: dict[str, dict[str, float | None]] = {}
    if not idx:
        return out
    for name, vals in per_example(task, raw).items():
        xs = [vals[i] for i in idx]
        out[name] = {"value": M.mean(xs), "stderr": M.mean_stderr(xs)}
    if task.kind == "lambada":
        lls = [raw["ll"][i] for i in idx]
        out["perplexity"] = {"value": M.perplexity(lls), "stderr": M.perplexity_stderr(lls, bootstrap_iters)}
    elif task.kind == "rolling":
        lls = [raw["ll"][i] for i in idx]
        for name, unit in (("word_perplexity", "words"), ("byte_perplexity", "bytes"), ("token_perplexity", "tokens")):
            out[name] = {"value": M.weighted_perplexity(lls, [raw[unit][i] for i in idx]), "stderr": None}
        out["bits_per_byte"] = {"value": M.bits_per_byte(lls, [raw["bytes"][i] for i in idx]), "stderr": None}
    return out
