"""The KV cache of incremental decoding: keys and values of past positions, per layer.

Used by every consumer of the inference runtime (generation, evaluation's shared-context
fills, prediction); the model's attention only calls ``update`` and ``mask``.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of past positions per layer, for incremental decoding.

    ``past_lengths`` ([b], optional): the rows' pasts are right-padded to ``length``: row r's
    first ``past_lengths[r]`` cached positions are real, the rest padding that no query sees,
    and its new tokens sit at positions ``past_lengths[r]...``. This lets rows that continue
    contexts of different lengths (multiple-choice endings of different questions) share one
    batch: each row's scores are those of its own context alone, to rounding."""

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.length = 0
        self.past_lengths: torch.Tensor | None = None
        self._mask: tuple[tuple[int, int], torch.Tensor, torch.Tensor | None] | None = None

    @property
    def offset(self) -> int | torch.Tensor:
        """The position of the next token: one for all rows, or one per row ([b])."""
        return self.length if self.past_lengths is None else self.past_lengths

    def mask(self, s: int, n_keys: int, device: torch.device) -> torch.Tensor:
        """Attention mask of ``s`` new queries over ``n_keys`` (the cached past, then the
        ``s`` new) keys: [s, n_keys], or [b, 1, s, n_keys] with ``past_lengths``. Built
        once per forward pass (every layer asks for the same one)."""
        if self._mask is not None and self._mask[0] == (s, n_keys) and self._mask[2] is self.past_lengths:
            return self._mask[1]
        past = n_keys - s
        mask = torch.ones(s, past + s, dtype=torch.bool, device=device).tril(past)
        if self.past_lengths is not None:
            real = torch.arange(past + s, device=device) < self.past_lengths.to(device)[:, None]  # [b, past+s]
            real[:, past:] = True                                # the new keys: causal alone
            mask = (mask[None] & real[:, None, :])[:, None]
        self._mask = ((s, n_keys), mask, self.past_lengths)
        return mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.k:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v
