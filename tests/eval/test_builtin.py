"""Built-in zero-shot tasks against an independent Hugging Face reference, and the
invariances that must hold in one process (batch size, context reuse, export format)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.eval.conftest import write_jsonl

TASKS = "lambada,wikitext,hellaswag"


def evaluate(model: Path, data: Path, ctx: Any, *extra: str, tasks: str = TASKS) -> dict[str, Any]:
    from gpt_dist.eval import tasks as T
    from gpt_dist.eval.driver import evaluate_model, parse_args
    from gpt_dist.eval.model import load_eval_model

    args = parse_args(["--model", str(model), "--tasks", tasks, "--data-dir", str(data),
                       "--no-progress", "--bootstrap-iters", "1000", *extra])
    loaded = [T.read(t, args.limit) for t in T.resolve(args.tasks, args.data_dir)]
    em = load_eval_model(model, ctx, args.tokenizer)
    return evaluate_model(em, loaded, args)


@pytest.fixture(scope="module")
def native_res(trained, ctx) -> dict[str, Any]:
    return evaluate(trained.native, trained.data, ctx)


@pytest.fixture(scope="module")
def ref(trained) -> dict[str, Any]:
    from gpt_dist.eval.convert import wikitext_detokenizer
    from tests.eval.reference import HFReference, reference

    return reference(HFReference(trained.hf), trained.data, wikitext_detokenizer)


def close(a: float, b: float, rel: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-5)


def test_metrics_equal_hf_reference(native_res, ref) -> None:
    t = native_res["tasks"]
    assert ref["lambada"]["margin"] > 1e-4 and ref["hellaswag"]["margin"] > 1e-4, "near-tie: comparison unsafe"
    # per example: LAMBADA log-likelihoods and greedy flags (some contexts are left-truncated)
    assert len(t["lambada"]["per_example"]["ll"]) == 40
    for a, b in zip(t["lambada"]["per_example"]["ll"], ref["lambada"]["ll"], strict=True):
        assert close(a, b), (a, b)
    assert t["lambada"]["per_example"]["greedy"] == ref["lambada"]["greedy"]
    assert 0 < t["lambada"]["metrics"]["acc"]["value"] < 1  # neither trivially right nor wrong
    for m in ("acc", "perplexity"):
        assert close(t["lambada"]["metrics"][m]["value"], ref["lambada"][m]), m
    for a, b in zip(t["wikitext"]["per_example"]["ll"], ref["wikitext"]["ll"], strict=True):
        assert close(a, b), (a, b)
    for m in ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity"):
        assert close(t["wikitext"]["metrics"][m]["value"], ref["wikitext"][m]), m
        assert t["wikitext"]["metrics"][m]["stderr"] is None  # lm-eval has none for these
    for row_a, row_b in zip(t["hellaswag"]["per_example"]["lls"], ref["hellaswag"]["lls"], strict=True):
        assert all(close(a, b) for a, b in zip(row_a, row_b, strict=True)), (row_a, row_b)
    for m in ("acc", "acc_norm"):
        assert t["hellaswag"]["metrics"][m]["value"] == pytest.approx(ref["hellaswag"][m], abs=1e-12), m
    # the mean's stderr: sample std / sqrt(n)
    acc = [float(g) for g in ref["lambada"]["greedy"]]
    mu = sum(acc) / len(acc)
    sd = math.sqrt(sum((x - mu) ** 2 for x in acc) / (len(acc) - 1))
    assert t["lambada"]["metrics"]["acc"]["stderr"] == pytest.approx(sd / math.sqrt(len(acc)), rel=1e-12)
    # multiple choice ran through the shared-context KV cache
    assert native_res["timing"]["context_passes_saved"] > 0


def _assert_same(a: dict[str, Any], b: dict[str, Any], rel: float = 1e-5) -> None:
    assert a["tasks"].keys() == b["tasks"].keys()
    for name in a["tasks"]:
        ma, mb = a["tasks"][name]["metrics"], b["tasks"][name]["metrics"]
        assert ma.keys() == mb.keys()
        for m in ma:
            assert close(ma[m]["value"], mb[m]["value"], rel), (name, m, ma[m], mb[m])
        pa, pb = a["tasks"][name]["per_example"], b["tasks"][name]["per_example"]
        for key in pa:
            flat_a = [x for r in pa[key] for x in (r if isinstance(r, list) else [r])]
            flat_b = [x for r in pb[key] for x in (r if isinstance(r, list) else [r])]
            assert len(flat_a) == len(flat_b)
            assert all(close(float(x), float(y), rel) for x, y in zip(flat_a, flat_b, strict=True)), (name, key)


def test_batch_size_and_context_reuse_do_not_change_numbers(trained, ctx, native_res) -> None:
    one = evaluate(trained.native, trained.data, ctx, "--batch-size", "1", "--no-reuse-context")
    assert one["timing"]["context_passes_saved"] == 0
    _assert_same(native_res, one)
    three = evaluate(trained.native, trained.data, ctx, "--batch-size", "3")
    _assert_same(native_res, three)


def test_hf_export_and_user_hf_dir_equal_native(trained, ctx, native_res, tmp_path) -> None:
    hf = evaluate(trained.hf, trained.data, ctx)
    assert hf["model"]["fingerprint"] == native_res["model"]["fingerprint"]
    _assert_same(native_res, hf)
    # a user's own HF directory: weights, config and tokenizer.json only (no gpt_dist files)
    user = tmp_path / "user_gpt2"
    user.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(trained.hf / f, user / f)
    res = evaluate(user, trained.data, ctx)
    assert res["model"]["tokenizer"] == "hf"
    _assert_same(native_res, res)


def test_rolling_windows_are_lm_eval_windows() -> None:
    from gpt_dist.eval.scoring import rolling_windows

    utils = pytest.importorskip("lm_eval.utils")
    for n in (0, 1, 5, 63, 64, 65, 130, 200):
        toks = list(range(1, n + 1))
        for ctx_len in (1, 7, 64):
            want = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(toks, 0, 64, ctx_len)]
            assert rolling_windows(toks, 0, 64, ctx_len) == [tuple(w) for w in want], (n, ctx_len)


def test_perplexity_stderr_is_lm_eval_bootstrap(monkeypatch) -> None:
    from gpt_dist.eval.metrics import perplexity_stderr

    metrics = pytest.importorskip("lm_eval.api.metrics")
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")
    import random

    xs = [random.Random(i).uniform(-9, -0.1) for i in range(37)]
    want = metrics.bootstrap_stderr(metrics.perplexity, xs, iters=2000)
    assert perplexity_stderr(xs, 2000) == pytest.approx(want, rel=1e-9)


def test_encode_pair_is_lm_eval_template(trained) -> None:
    """Our request tokenization equals lm-eval's TemplateLM on the same tokenizer."""
    from gpt_dist.eval.scoring import encode_pair
    from gpt_dist.tokenizer import load_tokenizer

    model_mod = pytest.importorskip("lm_eval.api.model")
    tok = load_tokenizer(trained.tok_dir)

    class T(model_mod.TemplateLM):
        eot_token_id = tok.eod_id

        def tok_encode(self, s, add_special_tokens=None, **kw):
            return tok.encode(s)

        def _loglikelihood_tokens(self, requests, **kw):
            return [(c, k) for _, c, k in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return []

        def generate_until(self, requests, disable_tqdm=False):
            return []

    class Req:
        def __init__(self, a):
            self.args = a

    cases = [("The quick brown", " fox"), ("The quick brown ", "fox"), ("", " fox jumps"), ("a  ", " b"),
             ("Question: x\nAnswer:", " yes"), ("", "<|endoftext|>x")]
    got = [encode_pair(tok, c, k, tok.eod_id) for c, k in cases]
    assert got == [tuple(x) for x in T().loglikelihood([Req(c) for c in cases], disable_tqdm=True)]


# --------------------------------------------------------------------------- errors


def _main(*argv: str) -> tuple[int, str]:
    import contextlib
    import io

    from gpt_dist.eval.driver import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(list(argv) + ["--no-progress"])
    return rc, err.getvalue().strip()


@pytest.mark.parametrize("rows,needle", [
    (['{"context": "a", "choices": ["x", "y"], "label": 0}', "{not json"], ":2: invalid JSON"),
    (['{"context": "a", "choices": ["x", "y"], "label": 2}'], ":1: 'label' must be an integer in [0, 2)"),
    (['{"context": "a", "choices": ["x"], "label": 0}'], ":1: 'choices' must be a list of at least 2"),
    (['{"choices": ["x", "y"], "label": 0}'], ":1: field 'context' missing"),
])
def test_bad_task_file_is_one_line(trained, ctx, tmp_path, rows, needle) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    rc, err = _main("--model", str(trained.native), "--tasks", f"mc:{path}")
    assert rc == 2 and needle in err and str(path) in err and len(err.splitlines()) == 1, err


def test_unknown_task_lists_known(trained, ctx) -> None:
    rc, err = _main("--model", str(trained.native), "--tasks", "lambada,nosuch", "--data-dir", str(trained.data))
    assert rc == 2 and "unknown task 'nosuch'" in err and "hellaswag" in err and "wikitext" in err, err


def test_tokenizer_mismatch_is_refused(trained, ctx, tmp_path) -> None:
    from gpt_dist.tokenizer import train_tokenizer
    from tests.eval.conftest import corpus_text

    (tmp_path / "c.txt").write_text(corpus_text(100))
    train_tokenizer([tmp_path / "c.txt"], 400, tmp_path / "big", num_threads=1)
    rc, err = _main("--model", str(trained.native), "--tasks", "lambada", "--data-dir", str(trained.data),
                    "--tokenizer", str(tmp_path / "big"))
    assert rc == 2 and "tokenizer/model mismatch" in err and "400 tokens" in err, err
    # the same size from other text: the HF export recorded its tokenizer's fingerprint
    (tmp_path / "d.txt").write_text(corpus_text(100).upper())
    train_tokenizer([tmp_path / "d.txt"], 320, tmp_path / "other", num_threads=1)
    assert json.loads((trained.hf / "export.json").read_text())["hf_tokenizer"]["fingerprint"]
    rc, err = _main("--model", str(trained.hf), "--tasks", "lambada", "--data-dir", str(trained.data),
                    "--tokenizer", str(tmp_path / "other"))
    assert rc == 2 and "tokenizer/model mismatch: the weights were trained with tokenizer" in err, err
