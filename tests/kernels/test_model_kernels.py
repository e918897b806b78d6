"""The whole model with every kernel on vs the reference path, TP=1 (TP=2: test_tp2.py).

On a CPU the fused bias-dropout-add draws F.dropout's own mask (gpt_dist/kernels/
bias_dropout_add.py), so dropout stays on here and the two paths still agree to float32
rounding. (CUDA's dropout has its own stream: there the comparison runs without dropout.)
"""

from __future__ import annotations

import pytest
import torch

from gpt_dist.config import KernelChoice
from tests.kernels.conftest import CUDA, DEVICE, gen, rel_err

TOL = 1e-5
ON = KernelChoice(layernorm=True, bias_gelu=True, bias_dropout_add=True, cross_entropy=True,
                  flash_attention=not CUDA, ce_chunk_tokens=7)  # CUDA flash: bf16 only


def _model(arch: str, kernels: KernelChoice | None, dropout: float):
    from gpt_dist.config import ModelConfig
    from gpt_dist.model.build import build_gpt as build_model

    mcfg = ModelConfig(arch=arch, n_layer=2, n_head=4, n_embd=48, n_ctx=16, vocab_size=301,
                       dropout=dropout, attn_dropout=0.0)  # CPU flash has no attention dropout
    return build_model(mcfg, seed=5, kernels=kernels).to(DEVICE)


@pytest.mark.parametrize("arch", ["gpt1", "gpt2"])
def test_loss_and_gradients_kernels_on_equal_off(ctx, arch):
    from gpt_dist import rng

    g = gen()
    ids, labels = (torch.randint(0, 301, (3, 13), generator=g).to(DEVICE) for _ in range(2))
    mask = (torch.rand(3, 13, generator=g) > 0.3).float().to(DEVICE)
    dropout = 0.0 if CUDA else 0.1
    out = {}
    for name, kernels in (("off", None), ("on", ON)):
        model = _model(arch, kernels, dropout).train()
        rng.seed_all(3)
        loss = model(ids, labels=labels, loss_mask=mask)
        loss.backward()
        out[name] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
        model.eval()
        with torch.no_grad():
            out[name + "_logits"] = model.logits(ids)
    (l_off, g_off), (l_on, g_on) = out["off"], out["on"]
    assert rel_err(l_on, l_off) < TOL
    assert g_on.keys() == g_off.keys() and len(g_on) > 10
    bad = {n: rel_err(g_on[n], g_off[n]) for n in g_off if rel_err(g_on[n], g_off[n]) >= TOL}
    assert not bad, bad
    assert rel_err(out["on_logits"], out["off_logits"]) < TOL
    if not CUDA:  # dropout is on: the same masks, or the losses would differ by far more
        # (the loss of a mean over ~30 tokens can move by only ~1e-4 with other masks: the
        # gradients are what shows it, by orders of magnitude more than TOL)
        rng.seed_all(4)
        other = _model(arch, ON, dropout).train()
        other(ids, labels=labels, loss_mask=mask).backward()
        moved = max(rel_err(p.grad, g_off[n]) for n, p in other.named_parameters())
        assert moved > 100 * TOL, moved


def test_kernel_choice_changes_no_parameter_name_or_shape(ctx):
    """What a checkpoint holds is the same with and without kernels (the resume itself:
    test_tp2.py)."""
    a, b = _model("gpt2", None, 0.1), _model("gpt2", ON, 0.1)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa)  # same init


def test_generation_with_a_kv_cache_runs_with_kernels_on(ctx):
    from gpt_dist.model.kv_cache import KVCache

    g = gen()
    ids = torch.randint(0, 301, (2, 6), generator=g).to(DEVICE)
    ref, model = _model("gpt2", None, 0.0).eval(), _model("gpt2", ON, 0.0).eval()
    with torch.no_grad():
        full = ref.logits(ids)
        cache = KVCache()
        first = model.logits(ids[:, :4], kv_cache=cache)
        step = model.logits(ids[:, 4:], kv_cache=cache)
    assert rel_err(torch.cat([first, step], dim=1), full) < TOL


def test_lm_loss_on_given_logits_fused_equals_reference(ctx):
    """``lm_loss(..., fused=True)``: the pipeline's last stage (kernels.cross_entropy), logits
    [s, b, V/tp] with the padding columns masked, labels and mask [b, s]."""
    from gpt_dist.model.lm_head import lm_loss, mask_padded_vocab
    from gpt_dist.parallel import TPGroup

    g = gen()
    logits = mask_padded_vocab(torch.randn(11, 3, 384, generator=g).to(DEVICE), 301, 384, TPGroup()).requires_grad_(True)
    labels = torch.randint(0, 301, (3, 11), generator=g).to(DEVICE)
    mask = (torch.rand(3, 11, generator=g) > 0.3).float().to(DEVICE)
    got = lm_loss(logits, labels, mask, fused=True)
    (g_got,) = torch.autograd.grad(got, logits)
    ref = lm_loss(logits.clone(), labels, mask)  # megatron-core shifts a float32 input in place
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert rel_err(got, ref) < TOL and rel_err(g_got, g_ref) < TOL
