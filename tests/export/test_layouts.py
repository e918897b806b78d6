"""The same weights exported from TP=1, TP=2 and ZeRO-3 checkpoints are identical; export ->
import under another layout -> export is bitwise; exporting reads one shard at a time."""

from __future__ import annotations

import json

import pytest
import torch

from tests import helpers

from .conftest import BASE_CONFIG, ROOT, native_state, random_model, train

# the tests' model (BASE_CONFIG) with random weights, LayerNorms and biases included
MODEL = {k: v for k, v in BASE_CONFIG["model"].items()}
FROZEN = {"optimizer.lr": 1e-30, "optimizer.weight_decay": 0.0, "training.train_steps": 1,
          "checkpoint.save_interval": 1, "training.eval_interval": 100}


def _tensors(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118


def _state(cfg, seed):
    """Random weights without exact zeros (0 + lr * update would not be a no-op)."""
    st = native_state(random_model(cfg, seed=seed), cfg)
    return {k: torch.where(v == 0, torch.full_like(v, 1e-3), v) for k, v in st.items()}


def _same(a_dir, b_dir):
    a, b = _tensors(a_dir / "model.safetensors"), _tensors(b_dir / "model.safetensors")
    assert a and set(a) == set(b), (sorted(a), sorted(b))
    return [k for k in a if not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))]


@pytest.fixture(scope="module")
def source(ctx, tmp_path_factory):
    """A native export of random weights, written from a TP=1 model in this process."""
    from gpt_dist.config import ModelConfig
    from gpt_dist.export import export_state

    cfg = ModelConfig(**MODEL)
    root = tmp_path_factory.mktemp("layouts")
    export_state(_state(cfg, 11), cfg, root / "e0")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "zero3_dp2"])  # TP=1: the memory test
def test_exports_of_every_layout_are_identical(toy_data, source, layout):
    """init_from the export into the layout, one step with lr 1e-30 (a no-op in fp32), save,
    export again: bit for bit the source (TP merge, vocabulary padding, ZeRO-3 gather of
    parameters that really are partitioned: checked in the run's own report)."""
    from gpt_dist.export import export_checkpoint, gather_checkpoint, load_native, resolve_checkpoint

    run = source / layout
    over = dict(FROZEN, **{"checkpoint.init_from": str(source / "e0")})
    if layout == "tp2":
        over["parallel.tp"] = 2
    if layout == "zero3_dp2":
        over["deepspeed.zero_optimization"] = helpers.zero3()
    train(toy_data, run, nproc=2, **over)
    if layout == "zero3_dp2":
        assert helpers.assert_zero3_partitioned(helpers.metrics_records(run), dp=2) == 1
    manifest = json.loads(next((run / "checkpoints").glob("global_step1/manifest.json")).read_text())
    assert manifest["layout"]["tp"] == (2 if layout == "tp2" else 1)
    assert manifest["layout"]["dp"] == (2 if layout == "zero3_dp2" else 1)
    export_checkpoint(run, source / f"{layout}_export")  # from the layout-free files
    assert _same(source / "e0", source / f"{layout}_export") == []
    # DeepSpeed's own files of that layout merge into the same weights (the padding aside)
    tag, manifest = resolve_checkpoint(run)
    native = gather_checkpoint(tag, manifest, source="deepspeed")
    free = gather_checkpoint(tag, manifest, source="layout_free")
    assert free and set(free) == set(native)
    assert [k for k, t in free.items() if not torch.equal(t, native[k][: t.shape[0]])] == []
    info = json.loads((source / f"{layout}_export" / "export.json").read_text())
    assert info["source"]["zero_stage"] == (3 if layout == "zero3_dp2" else 1)
    cfg, _ = load_native(source / f"{layout}_export")
    assert cfg.vocab_size == 500


_MEASURE = r"""
import json, sys
sys.path.insert(0, sys.argv[3])
import torch, safetensors.torch, deepspeed.utils.zero_to_fp32  # noqa: F401  (imports not measured)
import gpt_dist.export as E, gpt_dist.training.checkpoint  # noqa: F401


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])  # KiB


before = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as fh:  # resets VmHWM (the peak) to the current RSS
        fh.write("5")
except OSError:
    print(json.dumps({"skip": "cannot reset the peak RSS (/proc/self/clear_refs)"}))
    sys.exit(0)
E.export_checkpoint(sys.argv[1], sys.argv[2])
print(json.dumps({"before_kib": before, "peak_kib": status("VmHWM")}))
"""


@pytest.mark.slow
def test_export_memory_is_bounded_by_one_shard(ctx, toy_data, tmp_path):
    """A TP=1 ZeRO-1 checkpoint of a bigger model (init_from a random export, a no-op step)
    whose optimizer state (fp32 partition + Adam moments) is 3x the model: its export is the
    source bit for bit, and the export's peak memory stays below the model + the largest file
    it reads."""
    from gpt_dist.config import ModelConfig
    from gpt_dist.export import export_state

    big = {"model.n_embd": 512, "model.n_layer": 6, "model.n_head": 8}
    cfg = ModelConfig(**dict(MODEL, n_embd=512, n_layer=6, n_head=8))
    export_state(_state(cfg, 5), cfg, tmp_path / "e0")
    run = tmp_path / "big"
    train(toy_data, run, nproc=1, **big, **FROZEN, **{"checkpoint.init_from": str(tmp_path / "e0")})
    tag = run / "checkpoints" / "global_step1"
    model_files = list(tag.glob("*model_states.pt"))
    optim_bytes = sum(p.stat().st_size for p in tag.glob("*optim_states.pt"))
    shard = max(p.stat().st_size for p in model_files)
    res = helpers.run([helpers.PY, "-c", _MEASURE, run, tmp_path / "e", ROOT], timeout=300)
    assert res.rc == 0, res.stderr[-3000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    if "skip" in m:
        pytest.skip(m["skip"])
    peak = (m["peak_kib"] - m["before_kib"]) * 1024
    model_bytes = (tmp_path / "e" / "model.safetensors").stat().st_size
    bound = model_bytes + shard + 32 * 2**20
    print(f"export peak +{peak / 2**20:.0f} MiB; model {model_bytes / 2**20:.0f} MiB, largest shard "
          f"{shard / 2**20:.0f} MiB, optimizer state {optim_bytes / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB")
    assert optim_bytes + model_bytes > bound      # loading the optimizer state would fail the test
    assert peak < bound
    assert _same(tmp_path / "e0", tmp_path / "e") == []
