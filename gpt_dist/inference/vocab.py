"""Per-token log-probabilities, the greedy (argmax) token and whole logits from
vocabulary-parallel logits, on the TP group handed in (``TPGroup``).

The model's output layer is vocabulary parallel: TP rank r holds logits for token ids
``[r * V/tp, (r + 1) * V/tp)`` (``gpt_dist.model.lm_head.vocab_parallel_logits``). Gathering
the whole vocabulary on one rank costs ``b * s * V`` floats per batch (50,257 per position for
GPT-2); what evaluation needs is two numbers per position:

* ``log p(target)``: megatron-core's ``vocab_parallel_cross_entropy`` (the function training
  uses for its loss) is ``-log softmax`` at the target with three TP all-reduces of
  ``[b, s]`` tensors (max, target logit, sum of exponentials). Forward only here, in fp32,
  the same arithmetic as lm-eval's ``F.log_softmax`` (x - max - log sum exp(x - max)).
  (megatron-core reads its own TP group, the one ``ParallelContext`` initialised.)
* the greedy token: megatron-core has no vocabulary-parallel argmax (its inference code
  gathers the logits), so it is written here: each rank's local maximum and its index, an
  all-reduce MAX of the values, then an all-reduce MIN of the global indices of the ranks
  that hold the maximum, so ties resolve to the lowest id exactly as ``torch.argmax`` does on
  the gathered vocabulary.

Sampling (generation) needs the whole distribution of one position per row: ``gather_vocab``.
Vocabulary padding rows (added for TP) are already masked to the dtype's minimum by the
model, so no function here ever picks or weighs them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from gpt_dist.parallel import TPGroup


@torch.no_grad()
def vocab_parallel_argmax(logits: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Global argmax over the vocabulary of vocab-parallel ``logits`` [..., V/tp] -> int64 [...].

    Equal to ``torch.argmax`` of the gathered logits, ties included (lowest id wins)."""
    values, idx = logits.max(dim=-1)                     # first maximum of this shard
    if tp.size == 1:
        return idx
    idx = idx + tp.rank * logits.shape[-1]               # local -> global token id
    best = values.float().clone()
    dist.all_reduce(best, op=dist.ReduceOp.MAX, group=tp.group)
    cand = torch.where(values.float() == best, idx, torch.full_like(idx, torch.iinfo(torch.int64).max))
    dist.all_reduce(cand, op=dist.ReduceOp.MIN, group=tp.group)
    return cand


@torch.no_grad()
def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]`` in fp32 for contiguous vocab-parallel ``logits``
    [..., V/tp] and ``targets`` [...] (global ids) -> [...].

    ``logits`` may be overwritten (megatron-core subtracts the maximum and exponentiates in
    place to save memory): take anything else you need from them first."""
    return -vocab_parallel_cross_entropy(logits.float(), targets)


@torch.no_grad()
def score_tokens(logits: torch.Tensor, targets: torch.Tensor, tp: TPGroup, greedy: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(target) fp32, greedy token id int64 or None without ``greedy``) from
    vocab-parallel logits [..., V/tp]."""
    top = vocab_parallel_argmax(logits, tp) if greedy else None
    return vocab_parallel_logprobs(logits, targets), top


@torch.no_grad()
def gather_vocab(logits: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Vocab-parallel ``logits`` [..., V/tp] -> the whole padded vocabulary [..., V] on every
    TP rank (megatron-core's gather allocates on CUDA only: a plain all-gather)."""
    if tp.size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp.size)]
    dist.all_gather(parts, logits.contiguous(), group=tp.group)
    return torch.cat(parts, dim=-1)
