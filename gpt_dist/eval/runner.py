"""Forward passes of the evaluation model on this rank's part of the parallel layout.

The unit of work is an *item*:

* ``Fill(ids [1, s], key)``: run a shared context through the model and keep every layer's
  keys and values (``gpt_dist.model.gpt.KVCache``) under ``key``; nothing is scored;
* ``Score(ids [b, s], targets [b, s], cache)``: run ``ids`` (continuing after the cached
  context ``cache`` when given, its cache repeated to the ``b`` rows; with ``grow`` the cache
  itself is extended, for token-by-token generation) and return the fp32 log-probability of
  each target and the greedy (argmax) token id, ``[b, s]`` each.

Tensor parallel: every TP rank runs the same items on its slice; the log-probabilities come
from the vocabulary-parallel logits with TP reductions (``gpt_dist.eval.vocab``).

Pipeline parallel (pp > 1): the model is the ``PipelineModule`` stage that training uses
(``build_inference_model``). Its layers are run here one by one rather than through DeepSpeed's
pipeline engine, because the engine's schedule is a training schedule: fixed activation shapes
(evaluation batches differ in length), no KV cache, and it needs an engine. Each stage runs the
items in order: it receives the activation ``[s, b, h]`` from the previous stage (``recv``;
every rank knows every item's shape, so no shape message is needed), runs its layers and sends
the result on with ``isend``, so stage 0 moves on to the next item while stage 1 works on this
one (a forward-only pipeline). The last stage scores; at the end of a list of items its results
are broadcast over the pipeline group, so every rank returns the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gpt_dist.eval.vocab import score_tokens


@dataclass
class Fill:
    ids: torch.Tensor
    key: int


@dataclass
class Score:
    ids: torch.Tensor
    targets: torch.Tensor
    cache: int | None = None
    grow: bool = False
    first: int = 0
    """Positions before this one are not scored: the output layer runs on ``[first:]`` only
    (and the results are ``[b, s - first]``). The output layer (a ``[h, V]`` GEMM and a
    softmax over V) costs about as much per position as all blocks of a small model; a
    LAMBADA request scores 1-3 positions of ~100."""


Item = Fill | Score


def _stage_layers(model: Any) -> list[tuple[str, Any]]:
    """(kind, callable) for each layer of this stage: embed, block, or head (the final LN and
    the tied output layer: position-wise, skipped for ``Fill``)."""
    from gpt_dist.model.gpt import GPT

    if isinstance(model, GPT):
        head = model.head
        wte = model.embed.wte
        return ([("embed", model.embed)] + [("block", b) for b in model.h]
                + [("head", lambda x: head(x, wte.weight))])
    from gpt_dist.pipeline import BlockPipe, EmbeddingPipe

    out: list[tuple[str, Any]] = []
    for f in model.forward_funcs:
        if isinstance(f, EmbeddingPipe):
            out.append(("embed", f))
        elif isinstance(f, BlockPipe):
            out.append(("block", f))
        else:   # FinalNorm, the tied logits (a functools.partial over the embedding)
            out.append(("head", f))
    return out


class Runner:
    """Runs items on this rank (see the module docstring); ``ctx`` is the ParallelContext."""

    def __init__(self, model: Any, ctx: Any, n_embd: int) -> None:
        self.model, self.ctx, self.n_embd = model, ctx, n_embd
        self.layers = _stage_layers(model)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.caches: dict[int, Any] = {}
        self.step = ctx.tp * ctx.dp                       # global-rank distance between stages

    # ------------------------------------------------------------------ one stage
    def _forward(self, x: torch.Tensor, cache: Any, item: Item) -> torch.Tensor:
        from gpt_dist.model.gpt import Block, Embedding

        in_head = False
        for kind, f in self.layers:
            if kind == "embed":
                x = Embedding.forward(f, x, cache.length if cache is not None else 0)
            elif kind == "block":
                x = Block.forward(f, x, cache)
            elif isinstance(item, Fill):   # only the cache is wanted: no output layer
                break                      # (a later stage gets x unnormalised and skips it too)
            else:
                # [s, b, h] is position-wise from here on; only the last stage may drop positions
                # (a pipeline may cut between the final LN and the logits: x travels whole)
                if not in_head and item.first and self.ctx.pp_rank == self.ctx.pp - 1:
                    x = x[item.first:]
                in_head = True
                x = f(x)
        return x

    def _cache_for(self, item: Item) -> Any:
        from gpt_dist.model.gpt import KVCache

        if isinstance(item, Fill):
            self.caches[item.key] = KVCache()
            return self.caches[item.key]
        if item.cache is None:
            return None
        src, b = self.caches[item.cache], item.ids.shape[0]
        if item.grow:
            return src
        cache = KVCache()
        cache.length = src.length
        for layer in src.k:   # the context's keys/values, one copy per row (a view, not a copy)
            cache.k[layer] = src.k[layer].expand(b, -1, -1, -1)
            cache.v[layer] = src.v[layer].expand(b, -1, -1, -1)
        return cache

    # ------------------------------------------------------------------ many items
    @torch.no_grad()
    def run(self, items: list[Item], release: list[int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(log-probs, greedy token ids) [b, s] on CPU for each Score item, on every rank. Caches named
        in ``release`` are dropped afterwards."""
        ctx = self.ctx
        first, last = ctx.pp_rank == 0, ctx.pp_rank == ctx.pp - 1
        sends: list[Any] = []
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for item in items:
            ids = item.ids.to(self.device)
            cache = self._cache_for(item)
            if first:
                x = ids
            else:
                x = torch.empty(ids.shape[1], ids.shape[0], self.n_embd, dtype=self.dtype, device=self.device)
                dist.recv(x, src=ctx.rank - self.step)
            x = self._forward(x, cache, item)
            if cache is not None:
                cache.length += ids.shape[1]
            if not last:
                sends.append(dist.isend(x.contiguous(), dst=ctx.rank + self.step))
                sends = [w for w in sends if not w.is_completed()]
            elif isinstance(item, Score):
                # logits x [s, b, V/tp] as the model makes them (contiguous), targets [s, b]
                tgt = item.targets[:, item.first:]
                lp, top = score_tokens(x, tgt.t().contiguous().to(self.device))
                out.append((lp.float().t().contiguous().cpu(), top.t().contiguous().cpu()))
        for w in sends:
            w.wait()
        for key in release or []:
            self.caches.pop(key, None)
        if ctx.pp > 1:
            out = self._broadcast_scores(items, out)
        return out

    def _broadcast_scores(self, items: list[Item], out: list[tuple[torch.Tensor, torch.Tensor]]
                          ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The last stage's scores to every stage of this pipeline (one broadcast)."""
        from megatron.core import parallel_state as ps

        shapes = [(it.targets.shape[0], it.targets.shape[1] - it.first) for it in items if isinstance(it, Score)]
        total = sum(b * s for b, s in shapes)
        if ctx_last := (self.ctx.pp_rank == self.ctx.pp - 1):
            # token ids < 2^24 are exact in fp32
            flat = torch.cat([torch.cat([lp.reshape(-1), top.reshape(-1).float()]) for lp, top in out]) if out \
                else torch.zeros(0)
            buf = flat.to(self.device)
        else:
            buf = torch.empty(2 * total, dtype=torch.float32, device=self.device)
        dist.broadcast(buf, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
        if ctx_last:
            return out
        buf, res, at = buf.cpu(), [], 0
        for b, s in shapes:
            n = b * s
            res.append((buf[at:at + n].view(b, s).clone(), buf[at + n:at + 2 * n].view(b, s).round().long()))
            at += 2 * n
        return res
