"""An export loads into transformers and gives our model's logits (GPT-2 and GPT-1)."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import native_state, random_model, small_cfg


@pytest.mark.parametrize("arch", ["gpt2", "gpt1"])
def test_hf_logits_equal_ours(ctx, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    from gpt_dist.export import export_state, load_native, load_state_into_model
    from gpt_dist.model.build import build_gpt as build_model

    cfg = small_cfg(arch)
    src = random_model(cfg, seed=1)
    state = native_state(src, cfg)
    export_state(state, cfg, tmp_path / "native", "native", eod_id=299)
    export_state(state, cfg, tmp_path / "hf", "hf", eod_id=299)

    # our forward, with the weights read back from the native export
    cfg2, loaded = load_native(tmp_path / "native")
    assert cfg2 == cfg
    ours = build_model(cfg2, seed=99).eval()
    load_state_into_model(ours, loaded)
    ids = torch.randint(0, cfg.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours.logits(ids)[..., : cfg.vocab_size].double()

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == ("GPT2LMHeadModel" if arch == "gpt2" else "OpenAIGPTLMHeadModel")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["vocab_size"] == 300 and conf["n_positions"] == 32
    assert hf.config.eos_token_id == 299 and hf.config.bos_token_id == 299
    with torch.no_grad():
        got = hf(ids).logits.double()
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "export.json", "model.safetensors"]


@pytest.mark.parametrize("arch", ["gpt2", "gpt1"])
def test_hf_export_reads_back_to_native(ctx, tmp_path, arch):
    from gpt_dist.export import export_state, load_native

    cfg = small_cfg(arch)
    state = native_state(random_model(cfg, seed=2), cfg)
    export_state(state, cfg, tmp_path / "hf", "hf")
    cfg2, back = load_native(tmp_path / "hf")
    assert (cfg2.arch, cfg2.n_layer, cfg2.n_head, cfg2.n_embd, cfg2.n_ctx, cfg2.vocab_size) == \
        (cfg.arch, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_ctx, cfg.vocab_size)
    assert set(back) == set(state)
    for k in state:
        assert torch.equal(back[k], state[k]), k
