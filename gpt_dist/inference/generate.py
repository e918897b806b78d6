"""Text generation from any model source (native or Hugging Face export, run directory) on
the inference runtime (``gpt_dist.inference``), with a KV cache.

One process, or N processes under ``torchrun``/``deepspeed`` that split the model TP x PP
ways (``tp * pp`` = the world size: the runtime's stages and TP slices; every rank continues
with the token the first rank chose, so all stages and TP ranks decode the same sequence).
The prompt is run once to fill the cache; each new token then costs one position
(``inference.Last``: the last position's whole-vocabulary logits). When the sequence reaches
the model's context (``n_ctx``) the cache is rebuilt from the last ``n_ctx - 1`` tokens (a
sliding window).

Sampling (what this module adds to the runtime): ``temperature == 0`` is greedy (argmax, what
``transformers`` ``generate(do_sample=False)`` does); otherwise logits / temperature, then
top-k, then top-p (nucleus: the smallest set of tokens whose probability reaches p), sampled
with a seeded generator so ``--seed`` repeats a sample exactly. It stays a module of its own,
as ``finetune/predict.py`` does: the runtime runs passes, the applications decide what to run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gpt_dist import inference
from gpt_dist.inference import InferenceError, Last, LoadedModel, Runner
from gpt_dist.parallel import ParallelContext


def load_model(path: str | Path, ctx: ParallelContext, dtype: str = "fp32") -> LoadedModel:
    """The model of ``path`` on this rank's part of ``ctx`` (TP x PP over the whole world);
    the tokenizer too when the source has one (else ``tokenizer`` is None: token ids)."""
    if ctx.dp != 1:
        raise InferenceError(f"generation: tp ({ctx.tp}) x pp ({ctx.pp}) must be the world size "
                             f"({ctx.world_size}): no data parallelism")
    return inference.load_model(path, ctx, dtype=dtype, require_tokenizer=False)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """[b, V] logits with everything outside top-k / the top-p nucleus set to -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """[b, V] -> [b] token ids."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _sync_token(tok: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Every rank continues with the token of the replica's first rank (the first stage's TP
    rank 0): sampling seeds may differ between ranks."""
    if ctx.tp * ctx.pp == 1:
        return tok
    tok = tok.contiguous()
    dist.broadcast(tok, ctx.first_stage_rank - ctx.tp_rank, group=ctx.model_parallel_group)
    return tok


@torch.no_grad()
def generate_ids(loaded: LoadedModel, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 eos_id: int | None = None, use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield [b] new token ids, one step at a time. prompt: [b, s] ids (s >= 1).

    Rows that produced ``eos_id`` keep yielding ``eos_id``; the generator stops when every
    row has (or after ``max_new_tokens``)."""
    cfg, ctx = loaded.cfg, loaded.ctx
    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.shape[1] == 0:
        raise ValueError("the prompt must hold at least one token")
    if int(prompt.max()) >= cfg.vocab_size or int(prompt.min()) < 0:
        raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size})")
    runner = Runner(loaded.model, ctx, cfg)
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else torch.seed())

    def last_logits(ids: torch.Tensor, fresh: bool) -> torch.Tensor:
        if not use_cache:
            return runner.run([Last(ids)])[0]
        if fresh:
            runner.new_cache(0)
        return runner.run([Last(ids, cache=0)])[0]

    seq = prompt[:, -(cfg.n_ctx - 1):] if prompt.shape[1] >= cfg.n_ctx else prompt
    logits = last_logits(seq, fresh=True)
    done = torch.zeros(seq.shape[0], dtype=torch.bool)
    for i in range(max_new_tokens):
        tok = _sync_token(next_token(logits, temperature, top_k, top_p, gen), ctx)
        if eos_id is not None:
            tok = torch.where(done, torch.full_like(tok, eos_id), tok)
            done |= tok == eos_id
        yield tok
        if (eos_id is not None and bool(done.all())) or i == max_new_tokens - 1:
            return
        seq = torch.cat([seq, tok[:, None]], dim=1)
        if use_cache and runner.caches[0].length < cfg.n_ctx:
            logits = last_logits(tok[:, None], fresh=False)
        else:  # context full (or no cache): a fresh pass over the last n_ctx - 1 tokens
            seq = seq[:, -(cfg.n_ctx - 1):] if seq.shape[1] >= cfg.n_ctx else seq
            logits = last_logits(seq, fresh=True)


class TextStream:
    """The text of a continuation as its tokens arrive, decoded together with the prompt.

    Why not decode the new ids alone: sentencepiece stores a word's leading space in the
    word's piece ("▁passing") and drops it when that piece starts the decoded string, so a
    continuation decoded alone is glued to the prompt ("The function returnspassing");
    a byte-fallback character split across the boundary would be lost too. Each ``push``
    decodes prompt + continuation so far and returns only the text past what was returned
    before (text ending in an incomplete UTF-8 sequence waits for its other bytes).
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.done = len(tokenizer.decode(self.ids))  # characters of the prompt's own text

    def push(self, token_id: int) -> str:
        """Append one generated id; the newly complete text (may be '')."""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        return self._take(text)

    def flush(self) -> str:
        """Whatever is left, an incomplete trailing sequence included (end of generation)."""
        return self._take(self.tokenizer.decode(self.ids))

    def _take(self, text: str) -> str:
        new, self.done = text[self.done:], max(self.done, len(text))
        return new


def continuation_text(tokenizer: Any, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text ``new_ids`` add after the prompt (see TextStream for why not decode(new_ids))."""
    stream = TextStream(tokenizer, prompt_ids)
    return "".join(stream.push(t) for t in new_ids) + stream.flush()


def generate(loaded: LoadedModel, prompt_ids: list[int], max_new_tokens: int = 50, num_samples: int = 1,
             on_token: Callable[[int, int], None] | None = None, **sampling: Any) -> list[list[int]]:
    """New token ids per sample (prompt excluded); ``on_token(sample, id)`` streams them."""
    prompt = torch.tensor([prompt_ids] * num_samples, dtype=torch.long)
    out: list[list[int]] = [[] for _ in range(num_samples)]
    done = [False] * num_samples
    eos = sampling.pop("eos_id", loaded.eod_id)
    for step in generate_ids(loaded, prompt, max_new_tokens, eos_id=eos, **sampling):
        for i, t in enumerate(step.tolist()):
            if done[i]:
                continue
            out[i].append(t)
            if on_token is not None:
                on_token(i, t)
            done[i] = eos is not None and t == eos
    return out
