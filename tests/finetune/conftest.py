"""Fixtures of the fine-tuning data tests: two tiny sentencepiece tokenizers, trained once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "while", "a", "small", "cat", "sleeps",
         "near", "warm", "fire", "and", "people", "read", "good", "books", "about", "rivers", "mountains",
         "cities", "music", "science", "history"]


def corpus_text(n: int = 300) -> str:
    lines = []
    for i in range(n):
        w = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)]
        lines.append(f"{' '.join(w).capitalize()}. Number {i}, {i * 13}!\n")
    return "".join(lines)


@pytest.fixture(scope="session")
def ft_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("finetune")


@pytest.fixture(scope="session")
def tok(ft_tmp: Path):
    from gpt_dist.tokenizer import train_tokenizer

    corpus = ft_tmp / "corpus.txt"
    corpus.write_text(corpus_text(), encoding="utf-8")
    return train_tokenizer([corpus], 320, ft_tmp / "tok", num_threads=1)


@pytest.fixture(scope="session")
def tok_other(ft_tmp: Path):
    """A second tokenizer (another vocabulary size): another fingerprint."""
    from gpt_dist.tokenizer import train_tokenizer

    corpus = ft_tmp / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(corpus_text(), encoding="utf-8")
    return train_tokenizer([corpus], 340, ft_tmp / "tok_other", num_threads=1)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Rows as JSONL; a ``str`` row is written verbatim (for broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- fine-tuning runs
# Synthetic tasks a 2-layer, 32-wide model learns in a few dozen steps: each label is carried
# by which word starts a text (the start, extract and position-1 tokens are all the head
# needs), so "well above chance" tests the whole path (transformations, head, loss, loop)
# rather than the model's capacity.

CLASS_WORDS = ["cat", "dog", "fox"]
FILLER = [w for w in WORDS if w not in CLASS_WORDS]


def _words(rs: Any, n: int) -> str:
    return " ".join(FILLER[rs.randint(len(FILLER))] for _ in range(n))


def synthetic_tasks(out: Path, n_train: int = 192, n_valid: int = 48, seed: int = 0) -> Path:
    """cls/ent/sim/simreg/mc _{train,valid}.jsonl under ``out`` (see the comment above)."""
    import numpy as np

    rs = np.random.RandomState(seed)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid)):
        rows: dict[str, list[Any]] = {k: [] for k in ("cls", "ent", "sim", "simreg", "mc")}
        for _ in range(n):
            c = CLASS_WORDS[rs.randint(3)]
            rows["cls"].append({"text": f"{c} {_words(rs, 6)}", "label": c})
            yes = bool(rs.randint(2))
            first = "cat" if yes else FILLER[rs.randint(len(FILLER))]
            rows["ent"].append({"premise": _words(rs, 5), "hypothesis": f"{first} {_words(rs, 3)}",
                                "label": "yes" if yes else "no"})
            a_cat, b_cat = bool(rs.randint(2)), bool(rs.randint(2))
            ta = f"{'cat' if a_cat else 'dog'} {_words(rs, 3)}"
            tb = f"{'cat' if b_cat else 'dog'} {_words(rs, 3)}"
            rows["sim"].append({"text_a": ta, "text_b": tb, "label": "same" if (a_cat or b_cat) else "diff"})
            rows["simreg"].append({"text_a": ta, "text_b": tb, "score": float(a_cat + b_cat)})
            k = rs.randint(3)
            choices = [f"{'cat' if i == k else FILLER[rs.randint(len(FILLER))]} {_words(rs, 2)}" for i in range(3)]
            rows["mc"].append({"context": _words(rs, 5), "choices": choices, "label": k})
        for key, items in rows.items():
            write_jsonl(out / f"{key}_{split}.jsonl", items)
    return out


def small_vocab_export(out: Path, vocab: int) -> Path:
    """A native export of a random 2-layer, 32-wide GPT-2 whose vocabulary lacks the last 3
    ids of the tokenizer (as GPT-2's 50,257 lack start/delimiter/extract)."""
    import torch

    from gpt_dist.config import ModelConfig
    from gpt_dist.export import expected_shapes, export_state

    cfg = ModelConfig(arch="gpt2", n_layer=2, n_head=2, n_embd=32, n_ctx=48, vocab_size=vocab - 3,
                      make_vocab_size_divisible_by=4, dropout=0.0, attn_dropout=0.0)
    g = torch.Generator().manual_seed(3)
    state = {k: (torch.ones(s) if "ln_" in k and k.endswith("weight") else torch.randn(s, generator=g) * 0.02)
             for k, s in expected_shapes(cfg).items()}
    return export_state(state, cfg, out)


class FtRuns:
    """What tests/finetune/_ft_worker.py left in OUT."""

    def __init__(self, out: Path, tasks: Path, tok_dir: Path, log: str) -> None:
        self.out, self.tasks, self.tok_dir, self.log = out, tasks, tok_dir, log

    def records(self, name: str) -> list[dict[str, Any]]:
        from tests import helpers

        return [r for r in helpers.metrics_records(self.out / name) if "loss" in r]

    def by_step(self, name: str, key: str) -> list[float]:
        recs = {r["step"]: r[key] for r in self.records(name)}
        assert sorted(recs) == list(range(1, len(recs) + 1)), (name, sorted(recs))
        return [recs[s] for s in sorted(recs)]

    def results(self, name: str) -> dict[str, Any]:
        return json.loads((self.out / name / "results.json").read_text())


@pytest.fixture(scope="session")
def ft_runs(ft_tmp: Path, tok) -> FtRuns:
    from tests import helpers

    tasks = synthetic_tasks(ft_tmp / "tasks")
    small_vocab_export(tasks / "small_vocab_export", tok.vocab_size)
    out = ft_tmp / "runs"
    worker = Path(__file__).resolve().parent / "_ft_worker.py"
    res = helpers.run(helpers.python_cmd(worker, out, tasks, ft_tmp / "tok"), timeout=600,
                      log=ft_tmp / "ft_worker.log")
    assert res.rc == 0 and (out / "done").exists(), f"fine-tuning worker failed: {res.describe()}"
    return FtRuns(out, tasks, ft_tmp / "tok", res.output)
