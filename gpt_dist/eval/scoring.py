"""Log-likelihood requests scored on the parallel model, with lm-evaluation-harness's exact rules.

A request is lm-eval's encoded pair ``(context tokens, continuation tokens)``
(``encode_pair``: trailing whitespace of the context moves to the continuation; the
continuation is ``encode(context + continuation)[len(encode(context)):]``; an empty context
becomes the prefix token). Its result is ``(sum of log p over the continuation tokens,
every continuation token is the argmax)`` (``lm_eval/models/huggingface.py``
``_loglikelihood_tokens``), computed on

    input = (context + continuation)[-(max_length + 1):][:-1]       (left truncation)

Batches: requests sorted by length, longest first (lm-eval's order), right-padded to the
longest of the batch (padding sits after every real position: the causal mask keeps it out).

Shared contexts (multiple choice: one context, N choices): when every choice fits the window
untruncated, the context (all but its last token) runs once as a ``Fill`` and keeps its KV
cache; each choice then runs ``[last context token] + choice[:-1]`` after the cached
positions. Every scored position sees exactly the tokens, positions and attention it would
see in a full pass: the same numbers to rounding (tests: 1e-5), with the context's
computation done once instead of N times. Questions are packed: up to ``batch_size``
contexts (similar lengths: sorted) fill one right-padded batch, and their choices run in
batches of ``batch_size`` rows, each row continuing its own context at its own position
with the padding masked (``KVCache.past_lengths``), so a batch mixes the choices of
different questions as lm-eval's batches do.

Rolling perplexity: lm-eval's ``get_rolling_token_windows`` + ``make_disjoint_window``
(``lm_eval/utils.py``), re-implemented because lm-eval is an optional dependency: the first
window predicts the first ``max_length`` tokens after the prefix token; each next window
predicts the next ``max_length - context_len + 1`` tokens with the window's full context.
``context_len = 1`` is lm-eval's scheme; a larger one (``--rolling-stride``) gives every
prediction more context at more cost.

Data parallel (world > tp * pp): the batches are dealt out to the replicas and the results
all-gathered, so every rank ends with every number. On a ZeRO-3 engine's module (evaluation
during training, ``lockstep``) every replica runs as many passes as the busiest one
(``Runner.pad``): DeepSpeed gathers each layer's parameters collectively over the replicas.

The forward passes themselves are the inference runtime's (``gpt_dist.inference.runtime``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from gpt_dist.inference.runtime import Fill, Item, Runner, Score

Pair = tuple[list[int], list[int]]


def encode_pair(tok: Any, context: str, continuation: str, prefix_id: int) -> Pair:
    """lm-eval's ``TemplateLM.loglikelihood`` tokenization of one (context, continuation)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces and context.rstrip():
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if context == "" or not context.strip():
        cont = tok.encode(context + continuation)
        if cont and cont[0] == prefix_id:
            return cont[:1], cont[1:]
        return [prefix_id], cont
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]


def rolling_windows(tokens: list[int], prefix_id: int, max_len: int, context_len: int = 1) -> list[Pair]:
    """lm-eval's disjoint rolling windows (module docstring) as (context, continuation) pairs."""
    if not 1 <= context_len <= max_len:
        raise ValueError(f"rolling context {context_len} must be in [1, {max_len}]")
    if not tokens:
        return []
    pred_len = max_len - context_len + 1
    first = min(max_len, len(tokens))
    out = [([prefix_id], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, pred_len)
        end = done + n
        a = tokens[max(end - max_len - 1, 0): end - 1]
        out.append((a[: len(a) - (n - 1)], tokens[end - n: end]))
        done = end
    return out


@dataclass
class _Unit:
    """Items that run together (one batch, or shared contexts with their choices) and where
    each request's continuation lies in their outputs: (request, score item, offset, n): the
    ``n`` entries from ``offset`` of that item's flat (``select``-ed) results."""

    items: list[Item]
    slots: list[tuple[int, int, int, int]] = field(default_factory=list)
    release: list[int] = field(default_factory=list)


def _pad(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)


FILL_SHARE, PAD_TOKENS = 0.8, 16
"""A batch (rows sorted longest first, padded to the first) takes a row only if it pads that
row by at most ``PAD_TOKENS`` tokens or to at most 1/``FILL_SHARE`` of its length: a long
outlier does not pad a whole batch to its length (padded tokens cost as much as real ones
in every block), and short rows are not left to batches of their own (a forward pass has a
fixed cost: about 35 tokens' worth for a 4-layer model on one CPU thread)."""


def _batches(order: list[int], length: Any, batch_size: int) -> list[list[int]]:
    """``order`` (sorted by ``length``, longest first) cut into batches of at most
    ``batch_size`` items whose padding stays within the bounds above."""
    out: list[list[int]] = []
    for i in order:
        width = length(out[-1][0]) if out else 0
        if out and len(out[-1]) < batch_size and \
                width - length(i) <= max(PAD_TOKENS, (1 - FILL_SHARE) * width):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _scored(spans: list[tuple[int, int, int]], b: int) -> tuple[torch.Tensor, list[int]]:
    """Positions ``start..start+n`` of each ``(row, start, n)`` as ``Score.select`` indices
    into the flattened ``[s, b]``, and each span's offset among them."""
    idx, offsets = [], []
    for row, start, n in spans:
        offsets.append(len(idx))
        idx += [p * b + row for p in range(start, start + n)]
    return torch.tensor(idx, dtype=torch.long), offsets


class Scorer:
    """Scores requests on a ``LoadedModel`` (see the module docstring); ``lockstep``: the
    model is a ZeRO-3 engine's module."""

    def __init__(self, em: Any, batch_size: int = 8, reuse_context: bool = True, progress: bool = True,
                 items_per_run: int = 16, lockstep: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        self.em, self.ctx = em, em.ctx
        self.runner = Runner(em.model, em.ctx, em.cfg, lockstep=lockstep)
        self.max_length, self.batch_size = em.max_length, batch_size
        self.reuse_context, self.progress, self.items_per_run = reuse_context, progress, items_per_run
        self.stats = {"requests": 0, "context_passes_saved": 0, "forward_tokens": 0}

    # ------------------------------------------------------------------ planning
    def _plan(self, pairs: list[Pair], greedy: bool = True) -> list[_Unit]:
        L = self.max_length
        for i, (ctx, cont) in enumerate(pairs):
            if not ctx or not cont:
                raise ValueError(f"request {i}: empty {'context' if not ctx else 'continuation'} tokens")
            if len(cont) > L:
                raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds the context {L}")
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        plain: list[int] = []
        for i, (ctx, cont) in enumerate(pairs):
            if self.reuse_context and len(ctx) >= 2 and len(ctx) + len(cont) <= L + 1:
                groups[tuple(ctx)].append(i)
            else:
                plain.append(i)
        units: list[_Unit] = []
        shared = sorted((g for g in groups.values() if len(g) > 1),
                        key=lambda g: (-len(pairs[g[0]][0]), g[0]))
        plain += [g[0] for g in groups.values() if len(g) == 1]
        packs = _batches(list(range(len(shared))), lambda g: len(pairs[shared[g][0]][0]), self.batch_size)
        for key, pack in enumerate(packs):
            units.append(self._shared_unit(pairs, [shared[g] for g in pack], key))
        plain.sort(key=lambda i: (-len(pairs[i][0]) - len(pairs[i][1]), tuple(pairs[i][0] + pairs[i][1])))
        for batch in _batches(plain, lambda i: min(len(pairs[i][0]) + len(pairs[i][1]), L + 1), self.batch_size):
            units.append(self._plain_unit(pairs, batch, greedy))
        return units

    def _plain_unit(self, pairs: list[Pair], idx: list[int], greedy: bool = True) -> _Unit:
        L = self.max_length
        inputs, targets, spans = [], [], []
        for row, i in enumerate(idx):
            full = (pairs[i][0] + pairs[i][1])[-(L + 1):]
            inputs.append(full[:-1])
            targets.append(full[1:])
            n = len(pairs[i][1])
            spans.append((row, len(full) - 1 - n, n))
        self.stats["forward_tokens"] += sum(len(r) for r in inputs)
        select, offsets = _scored(spans, len(idx))
        slots = [(i, 0, at, n) for i, at, (_, _, n) in zip(idx, offsets, spans, strict=True)]
        return _Unit([Score(_pad(inputs), _pad(targets), select=select, greedy=greedy)], slots)

    def _shared_unit(self, pairs: list[Pair], groups: list[list[int]], key: int) -> _Unit:
        """One Fill of the groups' contexts (but their last tokens), then every choice of
        every group, longest first, in Scores of ``batch_size`` rows."""
        contexts = [pairs[g[0]][0][:-1] for g in groups]
        lengths = torch.tensor([len(c) for c in contexts], dtype=torch.long)
        unit = _Unit([Fill(_pad(contexts), key, None if len(set(lengths.tolist())) == 1 else lengths)],
                     release=[key])
        self.stats["forward_tokens"] += int(lengths.sum())
        self.stats["context_passes_saved"] += sum(len(g) - 1 for g in groups)
        members = sorted(((i, row) for row, g in enumerate(groups) for i in g),
                         key=lambda m: (-len(pairs[m[0]][1]), m[0]))
        for chunk in _batches(members, lambda m: len(pairs[m[0]][1]), self.batch_size):
            ids = [[pairs[i][0][-1]] + pairs[i][1][:-1] for i, _ in chunk]
            self.stats["forward_tokens"] += sum(len(r) for r in ids)
            item = len(unit.items) - 1   # index among this unit's Score items
            rows = torch.tensor([row for _, row in chunk], dtype=torch.long)
            select, offsets = _scored([(r, 0, len(pairs[i][1])) for r, (i, _) in enumerate(chunk)], len(chunk))
            unit.items.append(Score(_pad(ids), _pad([pairs[i][1] for i, _ in chunk]), cache=key, rows=rows,
                                    select=select))
            unit.slots += [(i, item, at, len(pairs[i][1])) for at, (i, _) in zip(offsets, chunk, strict=True)]
        return unit

    # ------------------------------------------------------------------ running
    def _runs(self, units: list[_Unit]) -> Iterator[list[_Unit]]:
        run: list[_Unit] = []
        for u in units:
            run.append(u)
            if sum(len(x.items) for x in run) >= self.items_per_run:
                yield run
                run = []
        if run:
            yield run

    def loglikelihood(self, pairs: list[Pair], desc: str = "loglikelihood", greedy: bool = True
                      ) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) for each request, in request order, on every rank
        (``greedy=False``: no argmax is computed and is_greedy is False)."""
        units = self._plan(pairs, greedy)
        ctx = self.ctx
        mine = units[ctx.dp_rank::ctx.dp]
        pad = 0
        if self.runner.lockstep and ctx.dp > 1:   # agreed before any pass: the passes are collectives
            passes = sum(len(u.items) for u in mine)
            most = torch.tensor([passes], dtype=torch.long, device=ctx.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX, group=ctx.dp_group)
            pad = int(most.item()) - passes
        results: dict[int, tuple[float, bool]] = {}
        bar = None
        if self.progress and ctx.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=sum(len(u.slots) for u in mine), desc=desc, unit="req", dynamic_ncols=True)
        for run in self._runs(mine):
            items = [it for u in run for it in u.items]
            outs = self.runner.run(items, release=[k for u in run for k in u.release])
            base = 0
            for u in run:
                scores = [it for it in u.items if isinstance(it, Score)]
                wants = [it.targets.t().reshape(-1).index_select(0, it.select) for it in scores]
                for req, item, at, n in u.slots:
                    lp, top = outs[base + item]
                    results[req] = (float(lp[at:at + n].double().sum()),
                                    bool((top[at:at + n] == wants[item][at:at + n]).all()))
                n_scores = len(scores)
                base += n_scores
                if bar is not None:
                    bar.update(len(u.slots))
        if bar is not None:
            bar.close()
        self.runner.pad(pad)   # lockstep: as many passes as the busiest replica
        if ctx.dp > 1:
            results = self._gather(results)
        self.stats["requests"] += len(pairs)
        return [results[i] for i in range(len(pairs))]

    def _gather(self, results: dict[int, tuple[float, bool]]) -> dict[int, tuple[float, bool]]:
        parts: list[Any] = [None] * self.ctx.dp
        dist.all_gather_object(parts, results, group=self.ctx.dp_group)
        merged: dict[int, tuple[float, bool]] = {}
        for p in parts:
            merged.update(p)
        return merged

    def loglikelihood_rolling(self, docs: list[list[int]], context_len: int = 1,
                              desc: str = "rolling") -> list[float]:
        """Summed log-likelihood of each token list (lm-eval's ``loglikelihood_rolling``)."""
        pairs, owner = [], []
        for d, toks in enumerate(docs):
            for w in rolling_windows(toks, self.em.prefix_id, self.max_length, context_len):
                pairs.append(w)
                owner.append(d)
        lls = [0.0] * len(docs)
        for d, (ll, _) in zip(owner, self.loglikelihood(pairs, desc=desc, greedy=False), strict=True):
            lls[d] += ll
        return lls
