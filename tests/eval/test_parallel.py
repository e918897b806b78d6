"""TP=2, PP=2 and DP=2 give the numbers of TP=1 (one 2-process launch, _parallel_worker.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests import helpers
from tests.eval.test_builtin import _assert_same, evaluate

pytestmark = pytest.mark.slow
WORKER = Path(__file__).resolve().parent / "_parallel_worker.py"


@pytest.fixture(scope="module")
def parallel_out(trained, eval_tmp) -> Path:
    out = eval_tmp / "parallel"
    res = helpers.run(helpers.python_cmd(WORKER, trained.native, trained.data, out),
                      env=helpers.child_env(GPT_DIST_PG_TIMEOUT="120"), timeout=600, log=eval_tmp / "parallel.log")
    errors = "\n".join(p.read_text()[-3000:] for p in sorted(out.glob("error_rank*.txt"))) if out.exists() else ""
    assert res.rc == 0 and (out / "done").exists(), f"{res.describe()}\n{errors}"
    return out


@pytest.fixture(scope="module")
def tp1(trained, ctx) -> dict[str, Any]:
    return evaluate(trained.native, trained.data, ctx)


def test_vocab_parallel_argmax_and_logprobs_tp2(parallel_out) -> None:
    got = json.loads((parallel_out / "vocab_tp2.json").read_text())
    assert got["ok"], got


@pytest.mark.parametrize("name", ["tp2", "pp2", "dp2"])
def test_layout_gives_tp1_numbers(parallel_out, tp1, name) -> None:
    res = json.loads((parallel_out / f"{name}.json").read_text())
    want = {"tp2": (2, 1, 1), "pp2": (1, 2, 1), "dp2": (1, 1, 2)}[name]
    s = res["settings"]
    assert (s["tp"], s["pp"], s["dp"]) == want
    assert res["model"]["fingerprint"] == tp1["model"]["fingerprint"]
    _assert_same(tp1, res)
    for task in ("lambada", "hellaswag"):
        assert res["tasks"][task]["metrics"]["acc"]["value"] == tp1["tasks"][task]["metrics"]["acc"]["value"]


def test_generation_pp2_equals_tp1(parallel_out, trained, ctx) -> None:
    pytest.importorskip("lm_eval")
    from gpt_dist.eval.harness import make_lm
    from gpt_dist.eval.model import load_eval_model
    from tests.eval._parallel_worker import GEN_CONTEXTS

    lm = make_lm(load_eval_model(trained.native, ctx), 8, progress=False)
    want = [lm._generate(c, {"until": ["."], "max_gen_toks": 6}) for c in GEN_CONTEXTS]
    assert json.loads((parallel_out / "gen_pp2.json").read_text()) == want
    assert any(w.strip() for w in want)
