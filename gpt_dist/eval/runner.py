"""Forward passes of the evaluation model on this rank's part of the parallel layout.

The unit of work is an *item*:

* ``Fill(ids [n, s], key, lengths)``: run ``n`` shared contexts (right-padded to ``s``; row
  r's real length ``lengths[r]``) through the model and keep every layer's keys and values
  (``gpt_dist.model.gpt.KVCache``) under ``key``; nothing is scored;
* ``Score(ids [b, s], targets [b, s], cache, rows)``: run ``ids`` (continuing after the
  cached contexts ``cache`` when given: row i after context ``rows[i]``, or after the one
  context repeated to the ``b`` rows; with ``grow`` the cache itself is extended, for
  token-by-token generation) and return the fp32 log-probability of each target and the
  greedy (argmax) token id, ``[b, s]`` each. Each row sees its own context's real positions
  only (``KVCache.past_lengths``) and continues at its own next position.

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
    lengths: torch.Tensor | None = None
    """[n] real lengths of right-padded contexts; None: every row is ``s`` long."""


@dataclass
class Score:
    ids: torch.Tensor
    targets: torch.Tensor
    cache: int | None = None
    grow: bool = False
    greedy: bool = True
    """Also the argmax token of each position (False: a rolling log-likelihood needs none,
    and the greedy ids come back as -1)."""
    rows: torch.Tensor | None = None
    """[b]: the cached context each row continues (None: the cache's one context, every row)."""
    select: torch.Tensor | None = None
    """[N]: the only positions scored, as indices into the flattened ``[s, b]`` (position-major:
    ``pos * b + row``); the output layer runs on these alone and the results are ``[N]``
    each (None: every position, ``[b, s]``). The output layer (a ``[h, V]`` GEMM and a
    softmax over V) costs about as much per position as all blocks of a small model; a
    LAMBADA request scores 1-3 positions of ~100, and right padding is never scored."""


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
        blocks = [n for n, (kind, _) in enumerate(self.layers) if kind == "block"]
        # the model's last block (on the last stage): a Fill needs only its keys and values
        self.last_block = blocks[-1] if blocks and ctx.pp_rank == ctx.pp - 1 else -1
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.caches: dict[int, Any] = {}
        self.step = ctx.tp * ctx.dp                       # global-rank distance between stages

    # ------------------------------------------------------------------ one stage
    def _forward(self, x: torch.Tensor, cache: Any, item: Item) -> torch.Tensor:
        from gpt_dist.model.gpt import Block, Embedding

        in_head = False
        for n, (kind, f) in enumerate(self.layers):
            if kind == "embed":
                x = Embedding.forward(f, x, cache.offset if cache is not None else 0)
            elif kind == "block" and isinstance(item, Fill) and n == self.last_block:
                Block.fill_cache(f, x, cache)   # the model's last layer: only its keys/values
                break
            elif kind == "block":
                x = Block.forward(f, x, cache)
            elif isinstance(item, Fill):   # only the cache is wanted: no output layer
                break                      # (a later stage gets x unnormalised and skips it too)
            else:
                # [s, b, h] is position-wise from here on; only the last stage may drop positions
                # (a pipeline may cut between the final LN and the logits: x travels whole)
                if not in_head and item.select is not None and self.ctx.pp_rank == self.ctx.pp - 1:
                    x = x.reshape(-1, 1, x.shape[-1]).index_select(0, item.select.to(x.device))  # [N, 1, h]
                in_head = True
                x = f(x)
        return x

    def _cache_for(self, item: Item) -> Any:
        from gpt_dist.model.kv_cache import KVCache

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
        if item.rows is None:
            for layer in src.k:   # the context's keys/values, one copy per row (a view, not a copy)
                cache.k[layer] = src.k[layer].expand(b, -1, -1, -1)
                cache.v[layer] = src.v[layer].expand(b, -1, -1, -1)
            return cache
        rows = item.rows.to(self.device)
        for layer in src.k:       # each row's own context ([b, nh/tp, past, hd], a copy)
            cache.k[layer] = src.k[layer].index_select(0, rows)
            cache.v[layer] = src.v[layer].index_select(0, rows)
        if src.past_lengths is not None:
            cache.past_lengths = src.past_lengths.index_select(0, rows)
        return cache

    # ------------------------------------------------------------------ many items
    @torch.no_grad()
    def run(self, items: list[Item], release: list[int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(log-probs, greedy token ids) [b, s] (or [N] with ``select``) on CPU for each Score
        item, on every rank. Caches named
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
                if isinstance(item, Fill) and item.lengths is not None:   # its rows: right-padded pasts
                    cache.past_lengths = item.lengths.to(self.device)
            if not last:
                sends.append(dist.isend(x.contiguous(), dst=ctx.rank + self.step))
                sends = [w for w in sends if not w.is_completed()]
            elif isinstance(item, Score):
                # logits x [s, b, V/tp] (or [N, 1, V/tp]) as the model makes them, targets alike
                tgt = item.targets.t()
                if item.select is not None:
                    tgt = tgt.reshape(-1, 1).index_select(0, item.select)
                lp, top = score_tokens(x, tgt.contiguous().to(self.device), item.greedy)
                if top is None:
                    top = torch.full(lp.shape, -1, dtype=torch.long)
                if item.select is not None:
                    out.append((lp.float().reshape(-1).cpu(), top.reshape(-1).cpu()))
                else:
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

        shapes = [tuple(it.targets.shape) if it.select is None else (len(it.select),)
                  for it in items if isinstance(it, Score)]
        total = sum(torch.Size(sh).numel() for sh in shapes)
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
        for sh in shapes:
            n = torch.Size(sh).numel()
            res.append((buf[at:at + n].view(sh).clone(), buf[at + n:at + 2 * n].view(sh).round().long()))
            at += 2 * n
        return res
