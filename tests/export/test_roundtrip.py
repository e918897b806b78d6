"""Checkpoints travel: a TP=2 run's export re-imports into TP=1 bit for bit; loading is safe."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests import helpers

from .conftest import ROOT, native_state, random_model, small_cfg, train


@pytest.fixture(scope="module")
def tp2_run(toy_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("tp2") / "run"
    train(toy_data, run, nproc=2, **{"parallel.tp": 2})
    return run


def _tensors(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118


@pytest.mark.slow
def test_tp2_export_reimported_into_tp1_is_bitwise_identical(ctx, tp2_run, tmp_path):
    from gpt_dist.export import export_state, load_native, load_state_into_model
    from gpt_dist.model.build import build_gpt as build_model

    res = helpers.run(helpers.python_cmd(ROOT / "launch" / "export.py", "--run", tp2_run, "--out", tmp_path / "e1"),
                      timeout=120)
    assert res.rc == 0, res.stderr[-2000:]
    info = json.loads((tmp_path / "e1" / "export.json").read_text())
    assert info["step"] == 3 and info["tokens_seen"] == 3 * 4 * 16
    assert info["validation_loss"] is not None and info["source"]["layout"]["tp"] == 2
    tok = helpers.toy_tokenizer()  # the run's tokenizer folder travels with the export, every file
    assert all((tmp_path / "e1" / f.name).read_bytes() == f.read_bytes() for f in tok.iterdir()), sorted(tok.iterdir())
    conf = json.loads((tmp_path / "e1" / "config.json").read_text())
    assert conf["model"]["vocab_size"] == 500 and conf["training_config"]["parallel"]["tp"] == 2

    cfg, state = load_native(tmp_path / "e1")
    assert state["wte.weight"].shape == (500, 32)          # padding rows (to 512) stripped
    model = build_model(cfg, seed=7)                        # TP=1, different init
    load_state_into_model(model, state)
    export_state(native_state(model, cfg), cfg, tmp_path / "e2")
    a, b = _tensors(tmp_path / "e1" / "model.safetensors"), _tensors(tmp_path / "e2" / "model.safetensors")
    assert a and set(a) == set(b), (sorted(a), sorted(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # and the merged weights are the trained ones, not the initialisation
    fresh = native_state(build_model(cfg, seed=BASE_SEED), cfg)
    assert not torch.equal(fresh["h.0.attn.c_attn.weight"], a["h.0.attn.c_attn.weight"])


BASE_SEED = 1234


@pytest.mark.slow
def test_init_from_loads_export_into_engine(ctx, tp2_run, tmp_path):
    """load_into_engine (checkpoint.init_from) on a ZeRO-1 engine: module and fp32 masters."""
    from gpt_dist.config import config_from_dict
    from gpt_dist.export import export_checkpoint, load_native
    from gpt_dist.training.engine import build_engine
    from gpt_dist.training.init_from import load_into_engine

    from .conftest import BASE_CONFIG

    export_checkpoint(tp2_run, tmp_path / "e1")
    cfg_d = json.loads(json.dumps(BASE_CONFIG))
    cfg_d["optimizer"]["lr"] = 1e-30  # a step must leave the loaded weights in place
    cfg_d["optimizer"]["weight_decay"] = 0.0
    cfg_d["training"]["global_batch_size"] = 2
    cfg = config_from_dict(cfg_d)
    eng = build_engine(cfg, ctx)
    load_into_engine(tmp_path / "e1", eng, cfg, ctx)
    _, state = load_native(tmp_path / "e1")
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = eng.ds(ids, ids, torch.ones_like(ids, dtype=torch.float))
    eng.ds.backward(loss)
    eng.ds.step()
    params = dict(eng.ds.module.named_parameters())
    assert torch.allclose(params["embed.wte.weight"][:500], state["wte.weight"], atol=1e-6)
    assert torch.allclose(params["h.1.mlp.c_proj.weight"], state["h.1.mlp.c_proj.weight"], atol=1e-6)
    assert torch.equal(params["embed.wte.weight"][500:], torch.zeros(12, 32))


@pytest.mark.slow
def test_corrupt_checkpoint_files_give_one_line_errors(tp2_run, tmp_path):
    from gpt_dist.export import ExportError, export_checkpoint
    from gpt_dist.utils import sha256_file

    run = tmp_path / "run"
    shutil.copytree(tp2_run / "checkpoints", run / "checkpoints")
    tag = run / "checkpoints" / "global_step3"
    shard = tag / "mp_rank_01_model_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ExportError, match="mp_rank_01_model_states.pt: size"):
        export_checkpoint(run, tmp_path / "out")
    # a manifest re-signed over the truncated file: torch.load itself fails, one line
    manifest = json.loads((tag / "manifest.json").read_text())
    manifest["files"][shard.name] = {"size": shard.stat().st_size, "sha256": sha256_file(shard)}
    (tag / "manifest.json").write_text(json.dumps(manifest))
    # (the export reads the layout-free files; DeepSpeed's own files through source="deepspeed")
    from gpt_dist.export import gather_checkpoint, resolve_checkpoint

    lf = min(tag.glob("lf_h.0.*"))
    lf.write_bytes(lf.read_bytes()[: lf.stat().st_size // 2])
    manifest["files"][lf.name] = {"size": lf.stat().st_size, "sha256": sha256_file(lf)}
    (tag / "manifest.json").write_text(json.dumps(manifest))
    os.environ["GPT_DIST_TRUST_CHECKPOINT"] = "1"
    try:
        with pytest.raises(ExportError) as err:
            gather_checkpoint(*resolve_checkpoint(run), source="deepspeed")
        with pytest.raises(ExportError) as lf_err:
            export_checkpoint(run, tmp_path / "out")
    finally:
        del os.environ["GPT_DIST_TRUST_CHECKPOINT"]
    assert "mp_rank_01_model_states.pt: cannot load" in str(err.value) and "\n" not in str(err.value)
    assert f"{lf.name}: cannot read layout-free file" in str(lf_err.value) and "\n" not in str(lf_err.value)
    res = helpers.run(helpers.python_cmd(ROOT / "launch" / "export.py", "--run", run, "--step", "7",
                                         "--out", tmp_path / "o"), timeout=120)
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0
    assert "global_step7" in res.stderr


def test_truncated_or_misshapen_safetensors_name_the_tensor(ctx, tmp_path):
    from safetensors.torch import save_file

    from gpt_dist.export import (
        ExportError,
        export_state,
        load_native,
        load_state_into_model,
    )
    from gpt_dist.model.build import build_gpt as build_model

    cfg = small_cfg()
    state = native_state(random_model(cfg), cfg)
    export_state(state, cfg, tmp_path / "e")
    w = tmp_path / "e" / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[:-100])
    with pytest.raises(ExportError, match=r"model.safetensors: truncated: tensor \S+ needs"):
        load_native(tmp_path / "e")
    bad = dict(state)
    bad["h.1.mlp.c_fc.weight"] = torch.zeros(5, 5)
    save_file(bad, str(w))
    with pytest.raises(ExportError, match=r"tensor h.1.mlp.c_fc.weight has shape \(5, 5\)"):
        load_native(tmp_path / "e")
    with pytest.raises(ExportError, match=r"tensor h.1.mlp.c_fc.weight has shape"):
        load_state_into_model(build_model(cfg), bad)
    w.unlink()
    (tmp_path / "e" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ExportError, match="pickle files are not loaded"):
        load_native(tmp_path / "e")


def test_state_slices_for_tp2_layout(ctx):
    """load_state_into_model's TP slicing, checked against the merge rules (no process group)."""
    from gpt_dist.export import _Merger, tp_dim

    cfg = small_cfg()
    state = native_state(random_model(cfg), cfg)
    padded = torch.cat([state["wte.weight"], torch.zeros(512 - 300, 32)])
    merger = _Merger(2)
    for r in range(2):
        for k, v in state.items():
            full = padded if k == "wte.weight" else v
            d = tp_dim(k)
            part = full if d is None else full.chunk(2, dim=d)[r]
            merger.add(k, part, r, ROOT)
    for k, v in state.items():
        got = merger.full[k][:300] if k == "wte.weight" else merger.full[k]
        assert torch.equal(got, v), k
