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
