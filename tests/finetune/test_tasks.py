"""Task files: GPT-1's input transformations, truncation, labels, one-line errors, the token cache."""

from __future__ import annotations

import json
import math
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from gpt_dist.finetune.tasks import (
    NO_LABEL,
    TaskFileError,
    TaskSpec,
    _longest_first,
    load_task_cached,
    read_task_file,
)

from .conftest import write_jsonl

A = "the quick brown fox jumps over the lazy dog"
B = "a small cat sleeps near the warm fire"
C = "people read good books about rivers"


def spec(task, n=2, max_len=256, **kw) -> TaskSpec:
    return TaskSpec(task=task, num_labels=n, max_len=max_len, **kw)


# ---- Figure 1's transformations ---------------------------------------------------------

def test_classification_sequence(tok, tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": A, "label": 1}, {"text": B, "label": 0}])
    exs, stats = read_task_file(f, spec("classification"), tok)
    assert [ex.sequences[0].tolist() for ex in exs] == [
        [tok.start_id, *tok.encode(A), tok.extract_id], [tok.start_id, *tok.encode(B), tok.extract_id]]
    assert [ex.label for ex in exs] == [1, 0] and [ex.line for ex in exs] == [1, 2]
    assert exs[0].sequences[0].dtype == np.int32
    assert stats.n_examples == 2 and stats.n_truncated == 0 and stats.label_counts == {0: 1, 1: 1}
    assert stats.max_seq_len == max(len(tok.encode(A)), len(tok.encode(B))) + 2


def test_entailment_sequence(tok, tmp_path):
    f = write_jsonl(tmp_path / "e.jsonl", [{"premise": A, "hypothesis": B, "label": 2}])
    (ex,), _ = read_task_file(f, spec("entailment", 3), tok)
    assert ex.sequences[0].tolist() == [tok.start_id, *tok.encode(A), tok.delimiter_id, *tok.encode(B), tok.extract_id]


def test_similarity_both_orderings(tok, tmp_path):
    f = write_jsonl(tmp_path / "s.jsonl", [{"text_a": A, "text_b": B, "label": 1}])
    (ex,), _ = read_task_file(f, spec("similarity"), tok)
    a, b = tok.encode(A), tok.encode(B)
    s, d, e = tok.start_id, tok.delimiter_id, tok.extract_id
    assert [q.tolist() for q in ex.sequences] == [[s, *a, d, *b, e], [s, *b, d, *a, e]]
    assert ex.label == 1 and isinstance(ex.label, int)


def test_similarity_regression_score(tok, tmp_path):
    f = write_jsonl(tmp_path / "r.jsonl", [{"text_a": A, "text_b": B, "score": 3},
                                           {"text_a": B, "text_b": C, "label": 4.25}])  # STS-B style "label"
    exs, stats = read_task_file(f, spec("similarity", 1), tok)
    assert [ex.label for ex in exs] == [3.0, 4.25] and all(isinstance(ex.label, float) for ex in exs)
    assert stats.label_counts == {}


def test_multiple_choice_k_sequences(tok, tmp_path):
    choices = [B, C, "music", ""]
    f = write_jsonl(tmp_path / "m.jsonl", [{"context": A, "choices": choices, "label": 2}])
    (ex,), stats = read_task_file(f, spec("multiple_choice", 4), tok)
    s, d, e = tok.start_id, tok.delimiter_id, tok.extract_id
    assert [q.tolist() for q in ex.sequences] == [[s, *tok.encode(A), d, *tok.encode(c), e] for c in choices]
    assert ex.label == 2 and stats.label_counts == {0: 0, 1: 0, 2: 1, 3: 0}


def test_string_and_int_labels(tok, tmp_path):
    f = write_jsonl(tmp_path / "l.jsonl", [{"text": A, "label": "neg"}, {"text": B, "label": "pos"},
                                           {"text": C, "label": 1}, {"text": C, "label": "pos"}])
    exs, stats = read_task_file(f, spec("classification", label_names=["neg", "pos"]), tok)
    assert [ex.label for ex in exs] == [0, 1, 1, 1] and stats.label_counts == {0: 1, 1: 3}
    mc = write_jsonl(tmp_path / "mcl.jsonl", [{"context": A, "choices": [B, C], "label": "B"}])
    (ex,), _ = read_task_file(mc, spec("multiple_choice", label_names=("A", "B")), tok)
    assert ex.label == 1


def test_blank_lines_skipped_and_line_numbers_kept(tok, tmp_path):
    f = write_jsonl(tmp_path / "b.jsonl", ["", {"text": A, "label": 0}, "   ", {"text": B, "label": 1}])
    exs, _ = read_task_file(f, spec("classification"), tok)
    assert [ex.line for ex in exs] == [2, 4]


def test_unlabelled_prediction_file(tok, tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"text": A}, {"text": B, "label": 1}])
    exs, stats = read_task_file(f, spec("classification"), tok, require_labels=False)
    assert [ex.label for ex in exs] == [NO_LABEL, 1] and stats.n_unlabelled == 1 and stats.label_counts == {0: 0, 1: 1}
    bad = write_jsonl(tmp_path / "p2.jsonl", [{"text": A}, {"text": B, "label": 7}])
    with pytest.raises(TaskFileError, match=r":2: label 7 out of range"):  # a present label is still checked
        read_task_file(bad, spec("classification"), tok, require_labels=False)
    r = write_jsonl(tmp_path / "p3.jsonl", [{"text_a": A, "text_b": B}])
    (ex,), stats = read_task_file(r, spec("similarity", 1), tok, require_labels=False)
    assert math.isnan(ex.label) and stats.n_unlabelled == 1


# ---- truncation -------------------------------------------------------------------------

def test_classification_truncation_sides(tok, tmp_path):
    long_text = " ".join([A, B, C] * 6)
    enc = tok.encode(long_text)
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": long_text, "label": 0}, {"text": "fox", "label": 1}])
    for side, kept in (("right", enc[:14]), ("left", enc[-14:])):
        exs, stats = read_task_file(f, spec("classification", max_len=16, truncate=side), tok)
        seq = exs[0].sequences[0].tolist()
        assert seq == [tok.start_id, *kept, tok.extract_id] and len(seq) == 16
        assert exs[0].truncated and not exs[1].truncated and stats.n_truncated == 1


def test_entailment_truncates_the_premise_first(tok, tmp_path):
    p, h = tok.encode(" ".join([A] * 5)), tok.encode(B)
    f = write_jsonl(tmp_path / "e.jsonl", [{"premise": " ".join([A] * 5), "hypothesis": B, "label": 0}])
    max_len = 3 + len(h) + 5
    (ex,), stats = read_task_file(f, spec("entailment", max_len=max_len), tok)
    assert ex.sequences[0].tolist() == [tok.start_id, *p[:5], tok.delimiter_id, *h, tok.extract_id]
    assert ex.truncated and stats.n_truncated == 1
    # a hypothesis longer than the whole context: the premise goes, then the hypothesis is cut
    (ex,), _ = read_task_file(f, spec("entailment", max_len=len(h) + 1), tok)
    assert ex.sequences[0].tolist() == [tok.start_id, tok.delimiter_id, *h[:len(h) - 2], tok.extract_id]


def test_similarity_truncation_is_symmetric(tok, tmp_path):
    long_a = " ".join([A] * 4)
    a, b = tok.encode(long_a), tok.encode(B)
    f = write_jsonl(tmp_path / "s.jsonl", [{"text_a": long_a, "text_b": B, "label": 0}])
    s, d, e = tok.start_id, tok.delimiter_id, tok.extract_id
    assert len(a) > len(b) + 2 >= 5
    # only the longer text is cut while it is the longer one
    max_len = 3 + len(b) + (len(b) + 2)
    (ex,), _ = read_task_file(f, spec("similarity", max_len=max_len, truncate="left"), tok)
    ka = a[-(len(b) + 2):]
    assert [q.tolist() for q in ex.sequences] == [[s, *ka, d, *b, e], [s, *b, d, *ka, e]]
    assert all(len(q) == max_len for q in ex.sequences) and ex.truncated
    # then both equally
    (ex,), _ = read_task_file(f, spec("similarity", max_len=3 + 6, truncate="right"), tok)
    assert [q.tolist() for q in ex.sequences] == [[s, *a[:3], d, *b[:3], e], [s, *b[:3], d, *a[:3], e]]


def test_longest_first_matches_cutting_one_token_at_a_time():
    for la in range(12):
        for lb in range(12):
            for budget in range(25):
                x, y = la, lb
                while x + y > budget:  # the reference: cut the longer by one, both on ties
                    if x > y:
                        x -= 1
                    elif y > x:
                        y -= 1
                    else:
                        x, y = x - 1, y - 1
                assert _longest_first(la, lb, budget) == (x, y), (la, lb, budget)
                # symmetric: swapping the texts swaps the lengths (similarity's two orderings)
                assert _longest_first(lb, la, budget) == (y, x), (la, lb, budget)


def test_multiple_choice_truncation_shares_the_context(tok, tmp_path):
    ctx_text = " ".join([A, C] * 4)
    choices = [B, "fox", " ".join([B] * 8)]
    f = write_jsonl(tmp_path / "m.jsonl", [{"context": ctx_text, "choices": choices, "label": 0}])
    max_len = 24
    (ex,), stats = read_task_file(f, spec("multiple_choice", 3, max_len=max_len), tok)
    enc = [tok.encode(c) for c in choices]
    cut = [c[:max_len - 3] for c in enc]  # the third choice alone is longer than the context
    ctx = tok.encode(ctx_text)[:max_len - 3 - max(len(c) for c in cut)]
    s, d, e = tok.start_id, tok.delimiter_id, tok.extract_id
    assert [q.tolist() for q in ex.sequences] == [[s, *ctx, d, *c, e] for c in cut]
    assert all(len(q) <= max_len and q[-1] == e and q[0] == s for q in ex.sequences)
    assert ex.truncated and stats.n_truncated == 1


# ---- bad files: one line FILE:LINE: reason ----------------------------------------------

GOOD_C = {"text": A, "label": 0}
BAD_CASES = [
    # (task spec kwargs, rows, line, reason regex)
    ({"task": "classification"}, [GOOD_C, '{"text": "x", "label": 0'], 2, r"invalid JSON"),
    ({"task": "classification"}, [GOOD_C, GOOD_C, "[1, 2]"], 3, r"expected a JSON object, got array"),
    ({"task": "classification"}, [{"label": 0}], 1, r'missing field "text" for a classification task$'),
    ({"task": "classification"}, [GOOD_C, {"text": 5, "label": 0}], 2, r'field "text" must be a string, got number'),
    ({"task": "classification"}, [{"text": A}], 1, r'missing field "label"'),
    ({"task": "classification"}, [{"text": A, "label": 2}], 1, r"label 2 out of range 0\.\.1"),
    ({"task": "classification"}, [{"text": A, "label": -1}], 1, r"label -1 out of range"),
    ({"task": "classification"}, [{"text": A, "label": True}], 1, r'"label" must be an int or a string, got boolean'),
    ({"task": "classification"}, [{"text": A, "label": 1.0}], 1, r'"label" must be an int or a string, got number'),
    ({"task": "classification"}, [{"text": A, "label": "pos"}], 1, r'string label "pos" but the task has no label_names'),
    ({"task": "classification", "label_names": ["neg", "pos"]}, [{"text": A, "label": "neutral"}], 1,
     r'unknown label "neutral" \(known: neg, pos\)'),
    ({"task": "classification", "label_names": ["neg", "pos"]}, [{"text": A, "label": 3}], 1,
     r"label 3 out of range 0\.\.1 \(neg, pos\)"),
    ({"task": "classification"}, [{"premise": A, "hypothesis": B, "label": 0}], 1,
     r"the fields \(hypothesis, label, premise\) look like an entailment task$"),
    ({"task": "entailment"}, [{"text": A, "label": 0}], 1,
     r'missing field "premise" for an entailment task; the fields \(label, text\) look like a classification task'),
    ({"task": "similarity"}, [{"context": A, "choices": [B], "label": 0}], 1, r"look like a multiple_choice task"),
    ({"task": "similarity"}, [{"text_a": A, "text_b": B, "score": 2.5}], 1,
     r'missing field "label" \(a score needs num_labels 1\)'),
    ({"task": "similarity", "n": 1}, [{"text_a": A, "text_b": B}], 1, r'missing field "score"'),
    ({"task": "similarity", "n": 1}, [{"text_a": A, "text_b": B, "score": "high"}], 1,
     r'"score" must be a finite number'),
    ({"task": "similarity", "n": 1}, ['{"text_a": "a", "text_b": "b", "score": NaN}'], 1, r"finite number"),
    ({"task": "multiple_choice", "n": 2}, [{"context": A, "choices": [], "label": 0}], 1, r'empty "choices"'),
    ({"task": "multiple_choice", "n": 2}, [{"context": A, "choices": B, "label": 0}], 1,
     r'"choices" must be an array of strings'),
    ({"task": "multiple_choice", "n": 2}, [{"context": A, "choices": [B, 3], "label": 0}], 1,
     r'"choices" must be an array of strings'),
    ({"task": "multiple_choice", "n": 2}, [{"context": A, "choices": [B, C], "label": 0},
                                          {"context": A, "choices": [B, C, A], "label": 0}], 2,
     r"ragged choices: 3 choices, but every example must have num_labels = 2"),
    ({"task": "multiple_choice", "n": 2}, [{"context": A, "choices": [B, C], "label": 2}], 1, r"out of range"),
    ({"task": "classification"}, [], 1, r"empty task file"),
    ({"task": "classification"}, ["", "  "], 1, r"empty task file"),
]


@pytest.mark.parametrize(("kw", "rows", "line", "reason"), BAD_CASES)
def test_bad_file_one_line_error(tok, tmp_path, kw, rows, line, reason):
    kw = dict(kw)
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(TaskFileError) as info:
        read_task_file(f, spec(kw.pop("task"), kw.pop("n", 2), **kw), tok)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{f}:{line}: "), msg
    assert info.value.line == line and info.value.path == str(f)
    assert re.search(reason, msg), msg


def test_not_utf8_and_missing_file(tok, tmp_path):
    f = tmp_path / "latin.jsonl"
    f.write_bytes(json.dumps(GOOD_C).encode() + b"\n" + b'{"text": "caf\xe9", "label": 0}\n')
    with pytest.raises(TaskFileError, match=rf"^{f}:2: not UTF-8"):
        read_task_file(f, spec("classification"), tok)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(TaskFileError, match=rf"^{missing}: cannot read the task file"):
        read_task_file(missing, spec("classification"), tok)


def test_whole_file_validated_before_tokenizing(tok, tmp_path, monkeypatch):
    f = write_jsonl(tmp_path / "late.jsonl", [GOOD_C] * 50 + ['{"oops"'])
    calls = []
    monkeypatch.setattr(tok, "encode_batch", lambda texts: calls.append(len(texts)) or [[] for _ in texts])
    with pytest.raises(TaskFileError, match=":51: invalid JSON"):
        read_task_file(f, spec("classification"), tok)
    assert calls == []


def test_bad_spec():
    with pytest.raises(ValueError, match="num_labels"):
        TaskSpec(task="classification", num_labels=1, max_len=16)
    with pytest.raises(ValueError, match="unknown task type"):
        TaskSpec(task="ranking", num_labels=2, max_len=16)  # type: ignore[arg-type]
    for names in (["a", "b"], ["a", "a", "b"], ["a", "b", 3], ["a", "b", "c", "d"]):
        with pytest.raises(ValueError, match="label_names"):
            TaskSpec(task="classification", num_labels=3, max_len=16, label_names=names)
    with pytest.raises(ValueError, match="label_names"):
        TaskSpec(task="similarity", num_labels=1, max_len=16, label_names=["score"])
    with pytest.raises(ValueError, match="max_len"):
        TaskSpec(task="entailment", num_labels=2, max_len=3)
    with pytest.raises(ValueError, match="truncate"):
        TaskSpec(task="entailment", num_labels=2, max_len=8, truncate="middle")  # type: ignore[arg-type]
    assert hash(TaskSpec(task="classification", num_labels=2, max_len=8, label_names=["a", "b"]))


# ---- the token cache --------------------------------------------------------------------

def _count_encodes(monkeypatch, tok) -> list[int]:
    calls: list[int] = []
    real = tok.encode_batch

    def counting(texts):
        calls.append(len(texts))
        return real(texts)

    monkeypatch.setattr(tok, "encode_batch", counting)
    return calls


def _same(a, b) -> bool:
    return [([s.tolist() for s in x.sequences], x.label, x.line, x.truncated) for x in a] == \
           [([s.tolist() for s in x.sequences], x.label, x.line, x.truncated) for x in b]


MC_ROWS = [{"context": f"{A} {i}", "choices": [B, C, f"{i}"], "label": i % 3} for i in range(7)]


def test_cache_hit_does_not_tokenize(tok, tmp_path, monkeypatch):
    f = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    sp = spec("multiple_choice", 3, max_len=12)
    calls = _count_encodes(monkeypatch, tok)
    first, s1 = load_task_cached(f, sp, tok, tmp_path / "cache")
    assert calls and not s1.from_cache
    calls.clear()
    second, s2 = load_task_cached(f, sp, tok, tmp_path / "cache")
    assert calls == [] and s2.from_cache
    assert _same(first, second)
    assert (s1.n_examples, s1.n_truncated, s1.label_counts, s1.sha256, s1.max_seq_len) == \
           (s2.n_examples, s2.n_truncated, s2.label_counts, s2.sha256, s2.max_seq_len)
    assert _same(first, read_task_file(f, sp, tok)[0])
    assert all(isinstance(ex.label, int) for ex in second)


def test_cache_keeps_regression_and_unlabelled(tok, tmp_path):
    f = write_jsonl(tmp_path / "r.jsonl", [{"text_a": A, "text_b": B, "score": -1.0}, {"text_a": B, "text_b": C}])
    sp = spec("similarity", 1)
    load_task_cached(f, sp, tok, tmp_path / "cache", require_labels=False)
    second, stats = load_task_cached(f, sp, tok, tmp_path / "cache", require_labels=False)
    assert stats.from_cache and second[0].label == -1.0 and math.isnan(second[1].label) and stats.n_unlabelled == 1


@pytest.mark.parametrize("change", ["file", "tokenizer", "max_len", "truncate", "label_names", "require_labels"])
def test_cache_invalidated(tok, tok_other, tmp_path, monkeypatch, change):
    rows = [{"text": f"{A} {i}", "label": "pos" if i % 2 else "neg"} for i in range(5)]
    f = write_jsonl(tmp_path / "c.jsonl", rows)
    base = {"max_len": 8, "truncate": "right", "label_names": ("neg", "pos")}
    load_task_cached(f, spec("classification", **base), tok, tmp_path / "cache")
    t, kw, req = tok, dict(base), True
    if change == "file":
        write_jsonl(f, rows[:4])
    elif change == "tokenizer":
        t = tok_other
    elif change == "max_len":
        kw["max_len"] = 9
    elif change == "truncate":
        kw["truncate"] = "left"
    elif change == "label_names":
        kw["label_names"] = ("pos", "neg")
    else:
        req = False
    exs, stats = load_task_cached(f, spec("classification", **kw), t, tmp_path / "cache", require_labels=req)
    assert not stats.from_cache
    assert _same(exs, read_task_file(f, spec("classification", **kw), t)[0])
    if change == "label_names":
        assert [ex.label for ex in exs] == [1, 0, 1, 0, 1]


class _Evil:
    """Unpickling this would create a file: a cache must never be unpickled."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _cache_file(tmp_path: Path) -> Path:
    (entry,) = (tmp_path / "cache").glob("*.npz")
    return entry


@pytest.mark.parametrize("damage", ["truncated", "garbage", "tampered_tokens", "other_key", "pickled"])
def test_corrupt_cache_rebuilt(tok, tmp_path, monkeypatch, damage):
    f = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    sp = spec("multiple_choice", 3)
    good, _ = load_task_cached(f, sp, tok, tmp_path / "cache")
    entry = _cache_file(tmp_path)
    data = entry.read_bytes()
    if damage == "truncated":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        entry.write_bytes(b"\x00" * 100)
    else:
        with np.load(entry, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        if damage == "tampered_tokens":
            arrays["tokens"] = arrays["tokens"].copy()
            arrays["tokens"][3] = (arrays["tokens"][3] + 1) % tok.vocab_size
        elif damage == "other_key":
            meta = json.loads(bytes(arrays["meta"]).decode())
            meta["key"] = "0" * 64
            arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        else:
            evil = _Evil()
            evil.marker = tmp_path / "PWNED"
            arrays["tokens"] = np.array([evil], dtype=object)
        with open(entry, "wb") as fh:
            np.savez(fh, **arrays)
    calls = _count_encodes(monkeypatch, tok)
    again, stats = load_task_cached(f, sp, tok, tmp_path / "cache")
    assert calls and not stats.from_cache and _same(good, again)
    assert not (tmp_path / "PWNED").exists()
    _, stats = load_task_cached(f, sp, tok, tmp_path / "cache")  # rewritten: a hit again
    assert stats.from_cache


def test_concurrent_writers(tok, tmp_path):
    f = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS * 20)
    sp = spec("multiple_choice", 3)
    results: list = [None] * 4
    errors: list[BaseException] = []

    def rank(i: int) -> None:
        try:
            results[i] = load_task_cached(f, sp, tok, tmp_path / "cache")[0]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(_same(results[0], r) for r in results[1:])
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")] == []
    _, stats = load_task_cached(f, sp, tok, tmp_path / "cache")
    assert stats.from_cache
