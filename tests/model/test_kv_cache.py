"""The KV cache with right-padded pasts (``KVCache.past_lengths``): rows continuing contexts of
different lengths in one batch score exactly as each row's own full forward pass (the
shared-context multiple-choice batching of gpt_dist/eval builds on this)."""

from __future__ import annotations

import pytest
import torch

from tests.model.test_layout import _small


@pytest.mark.parametrize("arch", ["gpt1", "gpt2"])
def test_rows_continue_their_own_padded_context(ctx, arch):
    from gpt_dist.model.gpt import KVCache, build_model

    mcfg = _small(arch)
    model = build_model(mcfg, seed=5).eval()
    g = torch.Generator().manual_seed(1)
    contexts = [torch.randint(0, mcfg.vocab_size, (n,), generator=g).tolist() for n in (5, 2, 7)]
    C = max(len(c) for c in contexts)
    # choices: (context row, tokens), of different lengths, two rows on context 0
    conts = [(0, 3), (1, 6), (2, 1), (0, 4)]
    conts = [(r, torch.randint(0, mcfg.vocab_size, (n,), generator=g).tolist()) for r, n in conts]
    S = max(len(t) for _, t in conts)
    padded = torch.tensor([c + [7] * (C - len(c)) for c in contexts])          # junk in the padding
    with torch.no_grad():
        fill = KVCache()
        model(padded, kv_cache=fill)
        rows = torch.tensor([r for r, _ in conts])
        cache = KVCache()
        cache.length = fill.length
        cache.k = {i: k.index_select(0, rows) for i, k in fill.k.items()}
        cache.v = {i: v.index_select(0, rows) for i, v in fill.v.items()}
        cache.past_lengths = torch.tensor([len(contexts[r]) for r, _ in conts])
        ids = torch.tensor([t + [3] * (S - len(t)) for _, t in conts])
        got = model(ids, kv_cache=cache)                                       # [b, S, V]
        for i, (r, t) in enumerate(conts):
            full = model(torch.tensor([contexts[r] + t]))[0, len(contexts[r]):]
            torch.testing.assert_close(got[i, :len(t)], full, atol=1e-5, rtol=1e-5)
        # without the mask the padding is seen: the check above can fail
        cache.past_lengths = None
        cache.k = {i: k.index_select(0, rows) for i, k in fill.k.items()}
        cache.v = {i: v.index_select(0, rows) for i, v in fill.v.items()}
        cache.length = fill.length
        unmasked = model(ids, kv_cache=cache)
        r, t = conts[1]
        full = model(torch.tensor([contexts[r] + t]))[0, len(contexts[r]):]
        assert (unmasked[1, :len(t)] - full).abs().max() > 1e-3
