"""The embedded sample corpus: deterministic, real English, WebText-like JSONL."""

from __future__ import annotations

import json
from pathlib import Path

from gpt_dist.data.sample_corpus import write_sample_corpus
from tests.data_tools.dt_common import run_cli


def test_deterministic_jsonl(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    ca = write_sample_corpus(a, max_bytes=10**9, packages=False, max_docs=60)
    write_sample_corpus(b, max_bytes=10**9, packages=False, max_docs=60)
    assert a.read_bytes() == b.read_bytes()
    rows = [json.loads(line) for line in a.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == ca["documents"] == 60
    assert all(set(r) >= {"text", "source"} and isinstance(r["text"], str) for r in rows)
    lengths = sorted(len(r["text"]) for r in rows)
    assert lengths[0] >= 300 and lengths[len(lengths) // 2] > 800  # documents of realistic length
    letters = sum(ch.isalpha() for r in rows for ch in r["text"])
    assert letters / sum(lengths) > 0.6  # mostly prose
    assert len({r["text"] for r in rows}) == 60


def test_cli_size_cap(tmp_path: Path) -> None:
    out = tmp_path / "c.jsonl"
    r = run_cli("sample_corpus.py", "--out", out, "--max-mb", "0.3", timeout=120)
    assert r.returncode == 0, r.stderr
    sizes = [len(json.loads(line)["text"].encode()) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sum(sizes[:-1]) < 300_000 <= sum(sizes)  # stops after the document that crosses the cap
