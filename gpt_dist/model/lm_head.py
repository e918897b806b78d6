"""The LM output layer's functions: the tied logits and the next-token loss, reference and fused.

Used by ``LMHead`` (``gpt.py``: the one head of the plain model and of the pipeline's last
stage) and by the fine-tuning head (``heads.py``). The TP group comes in explicitly
(``TPGroup``); megatron-core's own functions read its globals internally.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gpt_dist.model.sequence_parallel import seq_gather
from gpt_dist.parallel import TPGroup


def _tp() -> Any:
    from megatron.core import tensor_parallel

    return tensor_parallel


def _to_tp_output(x: torch.Tensor, tp: TPGroup, sequence_parallel: bool) -> torch.Tensor:
    """Hidden [s(/tp), b, h] -> [s, b, h] on every TP rank; backward sums the vocabulary shards'
    partial gradients (reduce-scatter under sequence parallelism, else all-reduce)."""
    if sequence_parallel:
        return seq_gather(x, tp, reduce_grad=True)
    if tp.size == 1:
        return x
    return _tp().copy_to_tensor_model_parallel_region(x)


def vocab_parallel_logits(x: torch.Tensor, wte: torch.Tensor, vocab: int, padded: int, tp: TPGroup,
                          sequence_parallel: bool) -> torch.Tensor:
    """Normalised hidden [s(/tp), b, h] -> this rank's logits [s, b, V/tp] with the tied ``wte``
    shard (the output layer of both the plain and the pipeline model)."""
    x = _to_tp_output(x, tp, sequence_parallel)             # each vocab shard: a partial grad of x
    logits = F.linear(x, wte)                                    # [s, b, V/tp]
    return mask_padded_vocab(logits, vocab, padded, tp)


def mask_padded_vocab(logits: torch.Tensor, vocab: int, padded: int, tp: TPGroup) -> torch.Tensor:
    """Padding rows (added for TP) never get probability: the model is exactly a distribution
    over the tokenizer's vocabulary, so export (which strips them) changes nothing."""
    if padded == vocab:
        return logits
    per = padded // tp.size
    start = tp.rank * per
    first_pad = vocab - start
    if first_pad >= per:
        return logits
    mask = torch.arange(per, device=logits.device) >= max(first_pad, 0)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
            fused: bool = False, tp: TPGroup | None = None) -> torch.Tensor:
    """L1 of GPT-1: mean over tokens of -log P(u_i | u_<i); logits [s, b, V/tp], labels [b, s].
    ``fused``: the streamed Triton CE (no float32 copy of the logits; ``tp`` its TP group),
    else megatron-core's."""
    if fused:
        # Triton: imported only when this kernel is on (TRITON_INTERPRET is read at import; kernels/__init__.py)
        from gpt_dist.kernels.cross_entropy import vocab_parallel_cross_entropy

        losses = vocab_parallel_cross_entropy(logits, labels.t().contiguous(), tp=tp)
    else:
        losses = _tp().vocab_parallel_cross_entropy(logits.float(), labels.t().contiguous())  # [s, b]
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.t().to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


def fused_lm_loss(hidden: torch.Tensor, wte: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None,
                  vocab: int, chunk: int, tp: TPGroup, sequence_parallel: bool) -> torch.Tensor:
    """``lm_loss(vocab_parallel_logits(hidden, wte, ...), labels, loss_mask)`` with the chunked
    CE fused with the tied output layer (``gpt_dist.kernels.cross_entropy``): hidden [s(/tp), b, h]."""
    # Triton: imported only when this kernel is on (TRITON_INTERPRET is read at import; kernels/__init__.py)
    from gpt_dist.kernels.cross_entropy import fused_linear_cross_entropy

    x = _to_tp_output(hidden, tp, sequence_parallel)            # [s, b, h], grad summed over TP
    n = x.shape[0] * x.shape[1]
    if loss_mask is None:
        w = torch.full((n,), 1.0 / n, dtype=torch.float32, device=x.device)
    else:
        m = loss_mask.t().reshape(-1).float()
        w = m / m.sum().clamp(min=1.0)
    return fused_linear_cross_entropy(x.reshape(n, x.shape[-1]), wte, labels.t().reshape(-1), w, vocab, chunk,
                                      tp=tp)
