"""The KV cache with right-padded pasts (``KVCache.past_lengths``): rows continuing contexts of
different lengths in one batch score exactly as each row's own full forward pass (the
shared-context multiple-choice batching of gpt_dist/eval builds on this)."""

from __future__ import annotations

import pytest
import torch

from tests.model.test_layout import _small


@pytest.mark.parametrize("arch", ["gpt1", "gpt2"])
def test_rows_continue_their_own_padded_context(ctx, arch):
    from gpt_dist.model.build import build_gpt
    from gpt_dist.model.kv_cache import KVCache

    mcfg = _small(arch)
    model = build_gpt(mcfg, seed=5).eval()
    g = torch.Generator().manual_seed(1)
    contexts = [torch.randint(0, mcfg.vocab_size, (n,), generator=g).tolist() for n in (5, 2, 7)]
    C = max(len(c) for c in contexts)
    # choices: (context row, tokens), of different lengths, two rows on context 0
    conts = [(0, 3), (1, 6), (2, 1), (0, 4)]
    conts = [(r, torch.randint(0, mcfg.vocab_size, (n,), generator=g).tolist()) for r, n in conts]
    S = max(len(t) for _, t in conts)
    ids = torch.tensor([t + [3] * (S - len(t)) for _, t in conts])
    rows = torch.tensor([r for r, _ in conts])

    def continue_after(junk: int) -> torch.Tensor:
        """The continuations after the contexts right-padded with ``junk``: [b, S, V]."""
        padded = torch.tensor([c + [junk] * (C - len(c)) for c in contexts])
        fill = KVCache()
        model.logits(padded, kv_cache=fill)
        cache = KVCache()
        cache.length = fill.length
        cache.k = {i: k.index_select(0, rows) for i, k in fill.k.items()}
        cache.v = {i: v.index_select(0, rows) for i, v in fill.v.items()}
        cache.past_lengths = torch.tensor([len(contexts[r]) for r, _ in conts])
        return model.logits(ids, kv_cache=cache)

    with torch.no_grad():
        got = continue_after(7)
        for i, (r, t) in enumerate(conts):
            full = model.logits(torch.tensor([contexts[r] + t]))[0, len(contexts[r]):]
            torch.testing.assert_close(got[i, :len(t)], full, atol=1e-5, rtol=1e-5)
        # what the padding holds is never seen (the rows of the shortest context included)
        torch.testing.assert_close(continue_after(123), got, atol=1e-6, rtol=1e-6)


def test_mask_follows_the_rows_past_lengths() -> None:
    from gpt_dist.model.kv_cache import KVCache

    cache = KVCache()
    cache.length = 3
    assert cache.mask(2, 5, torch.device("cpu")).tolist() == [[True] * 4 + [False], [True] * 5]
    cache.past_lengths = torch.tensor([1, 3])
    m = cache.mask(2, 5, torch.device("cpu"))
    assert m.shape == (2, 1, 2, 5)
    assert m[0, 0].tolist() == [[True, False, False, True, False], [True, False, False, True, True]]
    assert m[1, 0].tolist() == [[True] * 4 + [False], [True] * 5]
    cache.past_lengths = torch.tensor([2, 0])   # a new tensor: a new mask, not the one built above
    assert cache.mask(2, 5, torch.device("cpu"))[1, 0, 0].tolist() == [False, False, False, True, False]
