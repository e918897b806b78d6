"""Causal self-attention pinned to PyTorch's flash SDPA backend.

``F.scaled_dot_product_attention`` picks a backend by itself and falls back to the math one
(which stores the s x s score matrix) without a word when flash cannot take the inputs. With
``kernels.flash_attention`` on, the call runs under ``sdpa_kernel([FLASH_ATTENTION])``, so a
refusal is an error naming the switch instead of a silent slowdown; tests/kernels checks the
flash operator is the one that runs. The dropout of the attention probabilities uses the
device's default generator inside the caller's ``tp_region()`` (flash's Philox seed comes from
it), as the unrestricted call does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Causal SDPA of q, k, v [b, heads, s, head_dim] with the flash backend only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    except RuntimeError as exc:
        raise RuntimeError(
            f"kernels.flash_attention is on but PyTorch's flash backend refused {q.dtype} inputs of shape "
            f"{tuple(q.shape)} on {q.device} (dropout {dropout_p}): {exc}; set kernels.flash_attention auto/off"
        ) from exc
