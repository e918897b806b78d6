"""GPT-1 and GPT-2 as their papers lay them out (PAPERS_AND_NUMBERS.md).

* Parameter counts of the released models: GPT-2 small 124,439,808 and GPT-1 116,534,784,
  counting the real vocabulary rows only (the embedding is padded to a multiple of 128*tp).
* GPT-1 (Radford et al. 2018) is post-LN: ``x = LN(x + f(x))`` in every block, no final LN.
  GPT-2 (Radford et al. 2019, section 2.3) is pre-LN: ``x = x + f(LN(x))``, plus a final LN
  (``ln_f``) before the tied output layer. Checked on the module tree and on what a forward
  pass does (hook order and the tensors flowing between the sub-modules).

(Each config loading and validating, and the analytic count of gpt2_124m, are in
tests/test_config.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from gpt_dist.config import ModelConfig, load_config
from gpt_dist.model.gpt import analytic_parameters, count_parameters

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name,expected", [("gpt2_124m", 124_439_808), ("gpt1_117m", 116_534_784)])
def test_released_model_parameter_counts(meta_model, name, expected):
    mcfg = load_config(ROOT / "configs" / f"{name}.json").model
    model = meta_model(mcfg)
    assert model.embed.wte.weight.shape[0] == mcfg.padded_vocab_size(1) > mcfg.vocab_size
    assert count_parameters(model, mcfg) == analytic_parameters(mcfg) == expected


def test_released_model_shapes():
    g2 = load_config(ROOT / "configs" / "gpt2_124m.json").model
    assert (g2.arch, g2.n_layer, g2.n_head, g2.n_embd, g2.n_ctx, g2.vocab_size) == ("gpt2", 12, 12, 768, 1024, 50257)
    g1 = load_config(ROOT / "configs" / "gpt1_117m.json").model
    assert (g1.arch, g1.n_layer, g1.n_head, g1.n_embd, g1.n_ctx, g1.vocab_size) == ("gpt1", 12, 12, 768, 512, 40478)


def _small(arch: str) -> ModelConfig:
    return ModelConfig(arch=arch, n_layer=2, n_head=4, n_embd=32, n_ctx=16, vocab_size=300,
                       dropout=0.0, attn_dropout=0.0)


@pytest.mark.parametrize("arch", ["gpt1", "gpt2"])
def test_module_structure(meta_model, arch):
    model = meta_model(_small(arch))
    norms = sorted(n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm))
    blocks = [f"h.{i}.{ln}" for i in range(2) for ln in ("ln_1", "ln_2")]
    if arch == "gpt1":
        assert norms == blocks and model.head.ln_f is None
        assert all(not b.pre_ln for b in model.h)
    else:
        assert norms == sorted(blocks + ["head.ln_f"])
        assert all(b.pre_ln for b in model.h)
    # tied output layer: the head holds no weight, the logits use the token embedding
    assert [n for n, _ in model.head.named_parameters()] == (["ln_f.weight", "ln_f.bias"] if arch == "gpt2" else [])


def _trace(model):
    """Forward hooks on every block's sub-modules and ln_f: call order, inputs, outputs."""
    calls, handles = [], []
    names = {m: n for n, m in model.named_modules()}
    for n in ("ln_1", "attn", "ln_2", "mlp"):
        for block in model.h:
            handles.append(getattr(block, n).register_forward_hook(
                lambda mod, args, out: calls.append((names[mod], args[0].detach(), out.detach()))))
    for block in model.h:
        handles.append(block.register_forward_hook(
            lambda mod, args, out: calls.append((names[mod], args[0].detach(), out.detach()))))
    if model.head.ln_f is not None:
        handles.append(model.head.ln_f.register_forward_hook(
            lambda mod, args, out: calls.append(("head.ln_f", args[0].detach(), out.detach()))))
    return calls, handles


def _expected(per_block: list[str]) -> list[str]:
    """Hook order of the two blocks: each sub-module in turn, then the block itself."""
    return [name for i in range(2) for name in [f"h.{i}.{n}" for n in per_block] + [f"h.{i}"]]


@pytest.mark.parametrize("arch", ["gpt1", "gpt2"])
def test_layer_norm_placement_in_forward(ctx, arch):
    from gpt_dist.model.build import build_gpt as build_model
    from gpt_dist.model.lm_head import mask_padded_vocab
    from gpt_dist.parallel import TPGroup

    mcfg = _small(arch)
    model = build_model(mcfg, seed=3).eval()
    with torch.no_grad():  # non-trivial LN gains/biases so an LN is visible in the data
        for n, p in model.named_parameters():
            if "ln" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    calls, handles = _trace(model)
    ids = torch.randint(0, mcfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.logits(ids)
    for h in handles:
        h.remove()

    order = [name for name, _, _ in calls]
    if arch == "gpt1":  # x = LN(x + attn(x)); x = LN(x + mlp(x)); no final LN
        per_block = ["attn", "ln_1", "mlp", "ln_2"]
        assert order == _expected(per_block)
    else:               # x = x + attn(LN(x)); x = x + mlp(LN(x)); final LN
        per_block = ["ln_1", "attn", "ln_2", "mlp"]
        assert order == [*_expected(per_block), "head.ln_f"]

    rec = {name: (x, y) for name, x, y in calls}
    close = {"atol": 1e-5, "rtol": 1e-5}
    for i in range(2):
        x_in, x_out = rec[f"h.{i}"]
        attn_in, attn_out = rec[f"h.{i}.attn"]
        ln1_in, ln1_out = rec[f"h.{i}.ln_1"]
        ln2_in, ln2_out = rec[f"h.{i}.ln_2"]
        mlp_in, mlp_out = rec[f"h.{i}.mlp"]
        if arch == "gpt1":
            torch.testing.assert_close(attn_in, x_in)                   # attention sees the raw stream
            torch.testing.assert_close(ln1_in, x_in + attn_out, **close)  # LN after the residual add
            torch.testing.assert_close(mlp_in, ln1_out)
            torch.testing.assert_close(ln2_in, ln1_out + mlp_out, **close)
            torch.testing.assert_close(x_out, ln2_out)                  # the block ends with an LN
        else:
            torch.testing.assert_close(ln1_in, x_in)                    # LN before attention
            torch.testing.assert_close(attn_in, ln1_out)
            torch.testing.assert_close(ln2_in, x_in + attn_out, **close)  # residual around it
            torch.testing.assert_close(mlp_in, ln2_out)
            torch.testing.assert_close(x_out, ln2_in + mlp_out, **close)  # no LN on the stream
    last = rec["h.1"][1]
    if arch == "gpt2":
        torch.testing.assert_close(rec["head.ln_f"][0], last)
        last = rec["head.ln_f"][1]
    # the output layer is the tied token embedding applied to (ln_f of) the last block's output
    ref = mask_padded_vocab(torch.nn.functional.linear(last, model.embed.wte.weight),
                            mcfg.vocab_size, mcfg.padded_vocab_size(1), TPGroup()).transpose(0, 1)
    torch.testing.assert_close(logits, ref, **close)
