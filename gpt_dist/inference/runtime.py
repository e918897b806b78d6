"""Forward passes of a loaded model on this rank's part of the parallel layout: the one
runtime under evaluation, generation and prediction.

The unit of work is an *item*:

* ``Fill(ids [n, s], key, lengths)``: run ``n`` shared contexts (right-padded to ``s``; row
  r's real length ``lengths[r]``) through the model and keep every layer's keys and values
  (``gpt_dist.model.kv_cache.KVCache``) under ``key``; nothing is returned;
* ``Score(ids [b, s], targets [b, s], cache, rows)``: run ``ids`` (continuing after the
  cached contexts ``cache`` when given: row i after context ``rows[i]``, or after the one
  context repeated to the ``b`` rows; with ``grow`` the cache itself is extended, for
  token-by-token decoding) and return the fp32 log-probability of each target and the
  greedy (argmax) token id, ``[b, s]`` each. Each row sees its own context's real positions
  only (``KVCache.past_lengths``) and continues at its own next position;
* ``Last(ids [b, s], cache)``: the whole-vocabulary logits of each row's last position
  ``[b, V]`` (sampling), extending the cache ``cache`` when given;
* ``Classify(ids [b, s], extract_pos [b], n_examples)``: GPT-1's task head on the extract
  tokens' last hidden states, task logits ``[B, n]`` (prediction).

Stages run through ``pipeline.stage_parts``: the same parts (embedding, blocks, LM head, tied
output weight, task head) for a whole ``GPT`` and for this rank's ``PipelineModule`` stage.
Tensor parallel: every TP rank runs the same items on its slice; log-probabilities, argmax
and whole logits come from the vocabulary-parallel logits with TP reductions (``vocab.py``).

Pipeline parallel (pp > 1): the stage layers are run here rather than through DeepSpeed's
pipeline engine, because the engine's schedule is a training schedule: fixed activation
shapes (evaluation batches differ in length), no KV cache, and it needs an engine. Each stage
runs the items in order: it receives the activation ``[s, b, h]`` from the previous stage
(every rank knows every item's shape, so no shape message is needed), runs its layers and
sends the result on with ``isend``, so stage 0 moves on to the next item while stage 1 works
on this one (a forward-only pipeline). The last stage computes the results; at the end of a
list of items they are broadcast over the pipeline group, so every rank returns the same.

ZeRO-3 (``lockstep``: evaluation during a ZeRO-3 run, on the engine's module): the
parameters are partitioned over the data-parallel ranks, and DeepSpeed's hooks gather a
layer's parameters when its forward runs, collectively over the data-parallel group (the tied
output weight, used outside any forward, is gathered here). Every data-parallel rank must
then call the same layers in the same order: each pass runs every layer and the LM head
(a ``Fill`` too, on one position), and ``pad`` runs empty passes so that ranks with less work
run as many passes as the busiest (``eval.scoring`` pads its data-parallel shards).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gpt_dist.config import ModelConfig
from gpt_dist.inference.source import InferenceError
from gpt_dist.inference.vocab import gather_vocab, score_tokens
from gpt_dist.model.heads import TaskHeadSpec
from gpt_dist.model.kv_cache import KVCache
from gpt_dist.parallel import ParallelContext
from gpt_dist.pipeline import stage_parts


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


@dataclass
class Last:
    ids: torch.Tensor
    cache: int | None = None
    """The cache this pass continues and extends (None: no cache)."""


@dataclass
class Classify:
    ids: torch.Tensor
    extract_pos: torch.Tensor
    n_examples: int


Item = Fill | Score | Last | Classify


def _gathered(param: torch.Tensor | None) -> Any:
    """ZeRO-3: the whole (partitioned) parameter for the block, gathered over the DP group."""
    if param is None or not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed  # present whenever a parameter is ZeRO-3 partitioned

    return deepspeed.zero.GatheredParameters([param])


class Runner:
    """Runs items on this rank (see the module docstring)."""

    def __init__(self, model: Any, ctx: ParallelContext, cfg: ModelConfig, task: TaskHeadSpec | None = None,
                 lockstep: bool = False) -> None:
        self.model, self.ctx, self.cfg, self.task, self.lockstep = model, ctx, cfg, task, lockstep
        self.parts = stage_parts(model)
        self.first, self.last = ctx.is_first_stage, ctx.is_last_stage
        if self.last and (self.parts.head is None or self.parts.wte is None):
            raise InferenceError(f"pipeline stage {ctx.pp_rank}: the last stage lacks the LM head or the tied "
                                 "output weight (another --pipeline-partition)")
        self.tp = ctx.tensor_parallel
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.caches: dict[int, KVCache] = {}

    # ------------------------------------------------------------------ one stage
    def _forward(self, x: torch.Tensor, cache: KVCache | None, item: Item) -> torch.Tensor:
        parts, fill = self.parts, isinstance(item, Fill)
        if parts.embed is not None:
            x = parts.embed(x, cache.offset if cache is not None else 0)
        for i, block in enumerate(parts.blocks):
            if fill and self.last and not self.lockstep and i == len(parts.blocks) - 1:
                assert cache is not None
                block.fill_cache(x, cache)   # the model's last layer: only its keys and values
                return x
            x = block(x, cache)
        if not self.last:
            return x
        if fill:   # only the cache is wanted: no output layer (lockstep: one position, discarded)
            if self.lockstep:
                self._logits(parts.head.norm(x[:1, :1]))    # type: ignore[union-attr]
            return x
        return self._head(x, item)

    def _head(self, x: torch.Tensor, item: Item) -> torch.Tensor:
        """[s, b, h] is position-wise from here on: only the positions wanted go on."""
        if isinstance(item, Score) and item.select is not None:
            x = x.reshape(-1, 1, x.shape[-1]).index_select(0, item.select.to(x.device))  # [N, 1, h]
        elif isinstance(item, Last):
            x = x[-1:]                                                                  # [1, b, h]
        hidden = self.parts.head.norm(x)                                                # type: ignore[union-attr]
        if isinstance(item, Classify):
            th = self.parts.task_head
            if th is None:
                raise InferenceError("Classify: the model has no task head (load it with task_head=True)")
            return th.scores(th.extract(hidden, item.extract_pos.to(hidden.device)), item.n_examples)
        return self._logits(hidden)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        wte = self.parts.wte
        with _gathered(wte):
            return self.parts.head.logits(hidden, wte)                                  # type: ignore[union-attr]

    def _result(self, x: torch.Tensor, item: Item) -> tuple[torch.Tensor, ...]:
        """The last stage's output of one item, on CPU (see ``_shapes``)."""
        if isinstance(item, Score):
            # logits x [s, b, V/tp] (or [N, 1, V/tp]) as the model makes them, targets alike
            tgt = item.targets.t()
            if item.select is not None:
                tgt = tgt.reshape(-1, 1).index_select(0, item.select)
            lp, top = score_tokens(x, tgt.contiguous().to(self.device), self.tp, item.greedy)
            if top is None:
                top = torch.full(lp.shape, -1, dtype=torch.long)
            if item.select is not None:
                return lp.float().reshape(-1).cpu(), top.reshape(-1).cpu()
            return lp.float().t().contiguous().cpu(), top.t().contiguous().cpu()
        if isinstance(item, Last):
            return (gather_vocab(x[0], self.tp)[:, :self.cfg.vocab_size].float().cpu(),)
        return (x.float().cpu(),)

    def _shapes(self, item: Item) -> list[tuple[int, ...]]:
        """The shapes of an item's results, known on every stage (no shape message)."""
        if isinstance(item, Score):
            sh = tuple(item.targets.shape) if item.select is None else (len(item.select),)
            return [sh, sh]
        b = item.ids.shape[0]
        if isinstance(item, Last):
            return [(b, self.cfg.vocab_size)]
        assert isinstance(item, Classify) and self.task is not None, "Classify needs the runner's task"
        n = b // item.n_examples if self.task.task == "multiple_choice" else self.task.n_out
        return [(item.n_examples, n)]

    def new_cache(self, key: int) -> None:
        """An empty cache under ``key`` (decoding from nothing, or after a sliding window)."""
        self.caches[key] = KVCache()

    def _cache_for(self, item: Item) -> KVCache | None:
        if isinstance(item, Fill):
            self.caches[item.key] = KVCache()
            return self.caches[item.key]
        if isinstance(item, Classify) or item.cache is None:
            return None
        src, b = self.caches[item.cache], item.ids.shape[0]
        if isinstance(item, Last) or item.grow:
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
    def run(self, items: list[Item], release: list[int] | None = None) -> list[Any]:
        """The results of every item but the Fills, in order, on every rank: Score ->
        (log-probs, greedy token ids) [b, s] (or [N] with ``select``); Last -> logits [b, V];
        Classify -> task logits [B, n]. Caches named in ``release`` are dropped afterwards."""
        ctx = self.ctx
        sends: list[Any] = []
        out: list[tuple[torch.Tensor, ...]] = []
        for item in items:
            ids = item.ids.to(self.device)
            cache = self._cache_for(item)
            if self.first:
                x = ids
            else:
                x = torch.empty(ids.shape[1], ids.shape[0], self.cfg.n_embd, dtype=self.dtype, device=self.device)
                dist.recv(x, src=ctx.prev_stage_rank)
            x = self._forward(x, cache, item)
            if cache is not None:
                cache.length += ids.shape[1]
                if isinstance(item, Fill) and item.lengths is not None:   # its rows: right-padded pasts
                    cache.past_lengths = item.lengths.to(self.device)
            if not self.last:
                sends.append(dist.isend(x.contiguous(), dst=ctx.next_stage_rank))
                sends = [w for w in sends if not w.is_completed()]
            elif not isinstance(item, Fill):
                out.append(self._result(x, item))
        for w in sends:
            w.wait()
        for key in release or []:
            self.caches.pop(key, None)
        if ctx.pp > 1:
            out = self._broadcast(items, out)
        return [r if isinstance(it, Score) else r[0] for it, r in zip([i for i in items if not isinstance(i, Fill)],
                                                                      out, strict=True)]

    def pad(self, passes: int) -> None:
        """``passes`` passes whose results nobody reads (lockstep: see the module docstring)."""
        for _ in range(passes):
            one = torch.zeros(1, 1, dtype=torch.long)
            self.run([Score(one, one, greedy=False)])

    def _broadcast(self, items: list[Item], out: list[tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, ...]]:
        """The last stage's results to every stage of this pipeline (one broadcast; token ids
        < 2^24 are exact in fp32)."""
        shapes = [self._shapes(it) for it in items if not isinstance(it, Fill)]
        total = sum(torch.Size(sh).numel() for shs in shapes for sh in shs)
        if self.last:
            flat = [t.reshape(-1).float() for res in out for t in res]
            buf = (torch.cat(flat) if flat else torch.zeros(0)).to(self.device)
        else:
            buf = torch.empty(total, dtype=torch.float32, device=self.device)
        dist.broadcast(buf, src=self.ctx.last_stage_rank, group=self.ctx.pp_group)
        if self.last:
            return out
        buf, res, at = buf.cpu(), [], 0
        for item, shs in zip([i for i in items if not isinstance(i, Fill)], shapes, strict=True):
            parts = []
            for k, sh in enumerate(shs):
                n = torch.Size(sh).numel()
                t = buf[at:at + n].view(sh).clone()
                parts.append(t.round().long() if isinstance(item, Score) and k == 1 else t)
                at += n
            res.append(tuple(parts))
        return res
