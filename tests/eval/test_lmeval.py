"""Parity with lm-evaluation-harness itself, run offline on the same local task files:
its ``hf`` backend on the Hugging Face export, and lm-eval driving the project's model
through the adapter (``--harness lm-eval``); both against the built-in tasks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests import helpers
from tests.eval.test_builtin import evaluate

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow
WORKER = Path(__file__).resolve().parent / "_lmeval_worker.py"
PAIRS = {"gd_lambada": ("lambada", ["acc", "perplexity"]),
         "gd_wikitext": ("wikitext", ["word_perplexity", "byte_perplexity", "bits_per_byte"]),
         "gd_mc": ("hellaswag", ["acc", "acc_norm"])}


@pytest.fixture(scope="module")
def lmeval(trained, eval_tmp) -> dict[str, Any]:
    out = eval_tmp / "lmeval" / "results.json"
    out.parent.mkdir(exist_ok=True)
    res = helpers.run(helpers.python_cmd(WORKER, trained.hf, trained.native, trained.data, out), timeout=600,
                      log=eval_tmp / "lmeval.log")
    assert res.rc == 0, res.describe()
    return json.loads(out.read_text())


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)


def test_builtin_equals_lm_eval_hf_backend(trained, ctx, lmeval) -> None:
    mine = evaluate(trained.native, trained.data, ctx)["tasks"]
    for lm_name, (name, metrics) in PAIRS.items():
        theirs = lmeval["hf"]["results"][lm_name]
        assert theirs["sample_len"] == mine[name]["n"]
        for m in metrics:
            assert _close(mine[name]["metrics"][m]["value"], theirs[f"{m},none"]), (name, m)
            err = theirs[f"{m}_stderr,none"]
            if err == "N/A":
                assert mine[name]["metrics"][m]["stderr"] is None, (name, m)
            else:  # acc: closed form; perplexity: lm-eval's bootstrap replayed (1000 draws)
                assert _close(mine[name]["metrics"][m]["stderr"], err), (name, m)


def test_adapter_equals_lm_eval_hf_backend(lmeval) -> None:
    for lm_name, (_, metrics) in PAIRS.items():
        theirs, ours = lmeval["hf"]["results"][lm_name], lmeval["gpt_dist"]["results"][lm_name]
        for m in metrics:
            assert _close(ours[f"{m},none"], theirs[f"{m},none"]), (lm_name, m)
    # generate_until: the same greedy continuations. transformers decodes the continuation
    # alone and drops sentencepiece's leading space; the adapter decodes it after the prompt.
    hf_gen, ours_gen = lmeval["hf"]["gen"], lmeval["gpt_dist"]["gen"]
    assert len(hf_gen) == len(ours_gen) == 8
    assert [g.lstrip() for g in ours_gen] == [g.lstrip() for g in hf_gen]
    assert all(g.startswith(" ") for g in ours_gen)
