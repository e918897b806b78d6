"""TP=2 with the kernels on vs off, from ONE two-process launch (tests/kernels/_tp2_worker.py):
the model's loss and gradients (dropout on, sequence parallelism for GPT-2), the streamed CE
against megatron-core's over the TP group, and pretraining runs that switch kernels at a
resume. Kernel choice is not architecture: a checkpoint written with kernels resumes without
them and vice versa, and the runs continue as the reference run does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import helpers
from tests.kernels.conftest import rel_err

pytestmark = pytest.mark.slow
WORKER = Path(__file__).resolve().parent / "_tp2_worker.py"
TOL = 1e-5


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kernels_tp2")
    data = helpers.toy_shards(root / "data" / "toy", n_docs=200, lengths=(10, 60), seed=0)
    o = root / "out"
    res = helpers.run(helpers.python_cmd(WORKER, o, data), env=helpers.child_env(TRITON_INTERPRET="1"),
                      timeout=600, log=root / "worker.log")
    assert res.rc == 0 and (o / "done").exists(), f"rc={res.rc}\n{res.stdout[-6000:]}"
    return o


def _losses(run: Path) -> list[float]:
    recs = {r["step"]: r["loss"] for r in helpers.metrics_records(run) if "loss" in r}
    assert sorted(recs) == [1, 2, 3, 4], sorted(recs)
    return [recs[s] for s in sorted(recs)]


@pytest.mark.parametrize("arch", ["gpt1", "gpt2"])
def test_tp2_loss_and_gradients_kernels_on_equal_off(out, arch):
    off = torch.load(out / f"fwdbwd_{arch}_off.pt")
    on = torch.load(out / f"fwdbwd_{arch}_on.pt")
    assert abs(on["loss"] - off["loss"]) <= TOL * abs(off["loss"])
    assert abs(off["eval_loss"] - off["loss"]) > 2e-4  # dropout was on: the masks had to agree
    assert on["grads"].keys() == off["grads"].keys()
    bad = {n: rel_err(on["grads"][n], g) for n, g in off["grads"].items() if rel_err(on["grads"][n], g) >= TOL}
    assert not bad, bad


def test_tp2_streamed_ce_equals_megatron(out):
    ce = torch.load(out / "ce.pt")
    assert rel_err(ce["loss"], ce["ref"]) < TOL
    assert rel_err(ce["grad"], ce["ref_grad"]) < TOL
    assert ce["grad"][..., 500:].abs().max() == 0  # padding columns


def test_kernels_on_the_stage_engines_of_pp2_zero3(out):
    ref, got = _losses(out / "pp2z3_off"), _losses(out / "pp2z3_on")
    assert max(abs(a - b) for a, b in zip(ref, got, strict=True)) <= TOL, list(zip(ref, got, strict=True))


@pytest.mark.parametrize("run", ["on_ac", "on_then_off", "off_then_on"])
def test_kernels_switched_at_resume_continue_like_the_reference(out, run):
    ref, got = _losses(out / "off"), _losses(out / run)
    assert max(abs(a - b) for a, b in zip(ref, got, strict=True)) <= TOL, list(zip(ref, got, strict=True))
    if run != "on_ac":
        log = (out / run / "second_start.log").read_text()
        assert "resumed from" in log and "(step 2," in log, log[-2000:]
