"""Labelled tasks of every GPT-1 type, made from a JSONL corpus (``{"text", "source"}``).

The demo (and a user without a GLUE copy) needs tasks that exist on this machine. Each is
built from the sample corpus so that a language model that has learnt the corpus's prose
has something to transfer:

* ``multiple_choice`` (Story-Cloze-like): a passage and 4 candidate continuations; the one
  that really follows is the label, the others are continuations of other documents.
* ``entailment``: premise = a passage, hypothesis = a sentence-sized window; "follows" when
  the window is the passage's own continuation, "other" when it comes from another document.
* ``similarity``: two windows, label 1 when they come from the same document.
* ``classification``: a passage, labelled by the package its document comes from (the four
  packages with the most documents in the corpus; the standard library counts as one).

Documents are split between train/valid/test first (by a hash of their source), so no
document contributes to two splits. Word windows keep the text readable; the order and every
choice is fixed by the seed.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

TASK_NAMES = ("multiple_choice", "entailment", "similarity", "classification")


def _docs(corpus: Path, min_words: int) -> list[tuple[str, list[str]]]:
    out = []
    with open(corpus, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            words = rec.get("text", "").split()
            if len(words) >= min_words:
                out.append((str(rec.get("source", "")), words))
    return out


def package_of(source: str) -> str:
    parts = source.split("/")
    return parts[1] if parts[0] == "site-packages" and len(parts) > 1 else parts[0]


def _split_of(source: str) -> str:
    h = int(hashlib.sha256(source.encode()).hexdigest()[:8], 16) % 10
    return "test" if h == 0 else "valid" if h == 1 else "train"


def _window(rng: random.Random, words: list[str], n: int) -> tuple[int, list[str]]:
    start = rng.randrange(0, max(1, len(words) - n))
    return start, words[start:start + n]


def build_demo_tasks(corpus: str | Path, out_dir: str | Path, *, per_split: dict[str, int] | None = None,
                     context_words: int = 48, choice_words: int = 12, choices: int = 4,
                     seed: int = 0) -> dict[str, dict[str, Path]]:
    """Write ``OUT/TASK/{train,valid,test}.jsonl`` for every task type; returns their paths."""
    per_split = per_split or {"train": 1600, "valid": 300, "test": 300}
    rng = random.Random(seed)
    docs = _docs(Path(corpus), context_words + choice_words + 1)
    if len(docs) < 3 * choices:
        raise ValueError(f"{corpus}: {len(docs)} documents of {context_words + choice_words + 1}+ words; too few")
    by_split: dict[str, list[tuple[str, list[str]]]] = {"train": [], "valid": [], "test": []}
    for d in docs:
        by_split[_split_of(d[0])].append(d)
    counts: dict[str, int] = {}
    for source, _ in docs:
        counts[package_of(source)] = counts.get(package_of(source), 0) + 1
    packages = sorted(sorted(counts), key=lambda p: -counts[p])[:4]
    out: dict[str, dict[str, Path]] = {t: {} for t in TASK_NAMES}
    for split, n in per_split.items():
        pool = by_split[split] or docs
        rows: dict[str, list[dict[str, Any]]] = {t: [] for t in TASK_NAMES}
        for _ in range(n):
            i = rng.randrange(len(pool))
            source, words = pool[i]
            start, ctx = _window(rng, words, context_words)
            cont = words[start + context_words:start + context_words + choice_words]
            if len(cont) < choice_words:  # the window ran to the end: take the document's start
                start, ctx = 0, words[:context_words]
                cont = words[context_words:context_words + choice_words]
            others = [pool[j] for j in rng.sample(range(len(pool)), min(len(pool), choices + 1)) if j != i]
            distract = [_window(rng, w, choice_words)[1] for _, w in others[:choices - 1]]
            label = rng.randrange(choices)
            opts = distract[:label] + [cont] + distract[label:]
            rows["multiple_choice"].append({"context": " ".join(ctx), "choices": [" ".join(o) for o in opts],
                                            "label": label})
            follows = rng.random() < 0.5
            rows["entailment"].append({"premise": " ".join(ctx),
                                       "hypothesis": " ".join(cont if follows else distract[0]),
                                       "label": "follows" if follows else "other"})
            same = rng.random() < 0.5
            other_words = words if same else others[0][1]
            rows["similarity"].append({"text_a": " ".join(_window(rng, words, choice_words * 2)[1]),
                                       "text_b": " ".join(_window(rng, other_words, choice_words * 2)[1]),
                                       "label": int(same)})
            pkg_docs = [d for d in pool if package_of(d[0]) in packages]
            if pkg_docs:
                src, w = pkg_docs[rng.randrange(len(pkg_docs))]
                rows["classification"].append({"text": " ".join(_window(rng, w, context_words)[1]),
                                               "label": package_of(src)})
        for task, items in rows.items():
            path = Path(out_dir) / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
            tmp.replace(path)
            out[task][split] = path
    (Path(out_dir) / "classification" / "labels.json").write_text(json.dumps(packages) + "\n")
    return out
