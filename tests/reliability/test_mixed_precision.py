"""bf16 and fp16 training on CPU/gloo (DeepSpeed's BF16 optimizer and fp16 loss scaler run on
the CPU too): the reduced precision is really in use, a killed bf16 run resumes bit-exactly,
and the export of a bf16 checkpoint reads the fp32 master weights, not the bf16 copies.

Each run is the reliability suite's toy model (ZeRO-1, DP=2, dropout on) for 8 steps. A
precision this CPU lacks (fp16 without oneDNN fp16) is skipped with the reason config
validation gives for refusing it; tests/test_config.py covers that refusal itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from tests.reliability import conftest as c
from tests.reliability import harness as h

pytestmark = pytest.mark.slow
STEPS = 8


def needs(prec: str) -> None:
    """Skip unless this machine's device (the suite trains on CPU) runs ``prec``, with the
    reason config validation would refuse it: the same capability lookup
    (gpt_dist.device), so the test skips exactly where pretrain would exit 2. fp16 on CPU
    needs oneDNN fp16 (AVX512-FP16/AMX CPUs); most x86 CPUs have only bf16."""
    from gpt_dist.device import precision_problem

    why = precision_problem(prec, "cpu")
    if why:
        pytest.skip(f"training.precision={prec}: {why}")


@pytest.fixture(scope="module")
def runs(rel_tmp, data) -> Callable[[str], h.Result]:
    """The runs by name (fp32, bf16, fp16, bf16_killed), each launched once, when first asked
    for: a precision the device lacks is never launched (its tests skip first)."""
    done: dict[str, h.Result] = {}

    def get(name: str) -> h.Result:
        if name not in done:
            if name == "bf16_killed":
                done[name] = c.launch(rel_tmp, data, "mp_bf16_killed", training__precision="bf16",
                                      training__train_steps=STEPS, max_restarts=1,
                                      env={"GPT_DIST_TEST_KILL_AT": "7:1"})
            else:
                done[name] = c.launch(rel_tmp, data, f"mp_{name}", training__precision=name,
                                      training__train_steps=STEPS)
        return done[name]

    return get


@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_low_precision_is_in_use_and_trains(runs, prec: str) -> None:
    needs(prec)
    for name in ("fp32", prec):
        assert runs(name).rc == 0, runs(name).describe()
    m = {p: h.metrics(runs(p).run_dir) for p in ("fp32", prec)}
    assert sorted(m[prec]) == list(range(1, STEPS + 1))
    losses = [m[prec][s]["loss"] for s in range(1, STEPS + 1)]
    assert all(math.isfinite(x) for x in losses)
    # close to fp32 (same data, same init) but not equal: the low precision is really used
    diffs = [abs(m[prec][s]["loss"] - m["fp32"][s]["loss"]) for s in range(1, STEPS + 1)]
    assert max(diffs) < 2e-2 and max(diffs) > 0, (prec, diffs)
    assert losses[-1] < losses[0]
    if prec == "fp16":
        assert {m["fp16"][s]["loss_scale"] for s in m["fp16"]} != {1.0}  # the dynamic loss scaler runs
    else:
        assert all(r["loss_scale"] == 1.0 for r in m["bf16"].values())
        tag = runs("bf16").run_dir / "checkpoints" / f"global_step{STEPS}"
        assert sorted(p.name for p in tag.glob("bf16_zero_*optim_states.pt")), sorted(tag.iterdir())


def test_killed_bf16_run_resumes_bit_exactly(runs) -> None:
    needs("bf16")
    res = runs("bf16_killed")
    assert res.rc == 0 and res.restarts == 1, res.describe()
    assert "resumed from" in res.output and "global_step4" in res.output
    assert h.diff_runs(h.metrics(runs("bf16").run_dir), h.metrics(res.run_dir)) == []


@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_export_reads_fp32_master_weights(runs, tmp_path, prec: str) -> None:
    from gpt_dist.export import canonical_name, export_checkpoint, load_native

    needs(prec)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[prec]
    run = runs(prec).run_dir
    assert runs(prec).rc == 0, runs(prec).describe()
    module_file = run / "checkpoints" / f"global_step{STEPS}" / "mp_rank_00_model_states.pt"
    module = torch.load(module_file, map_location="cpu", weights_only=False)["module"]
    assert {t.dtype for t in module.values() if torch.is_tensor(t) and t.is_floating_point()} == {low}

    _, fp32 = load_native(export_checkpoint(run, tmp_path / "fp32"))
    _, half = load_native(export_checkpoint(run, tmp_path / prec, dtype=prec))
    assert {t.dtype for t in fp32.values()} == {torch.float32}
    assert {t.dtype for t in half.values()} == {low}
    # the fp32 export holds values the low-precision module cannot: the master weights
    w = fp32["h.0.attn.c_attn.weight"]
    assert not torch.equal(w, w.to(low).float())
    # the low-precision export is the master weight rounded, as the module's copy is
    assert torch.equal(half["h.0.attn.c_attn.weight"], w.to(low))
    named = {canonical_name(k, 2): v for k, v in module.items() if canonical_name(k, 2)}
    assert torch.equal(half["h.0.attn.c_attn.weight"], named["h.0.attn.c_attn.weight"])
