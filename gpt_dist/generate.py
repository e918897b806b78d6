"""Text generation from an export (native or Hugging Face GPT-2/GPT-1 directory) with a KV cache.

One process (TP=1), or N processes under ``torchrun``/``deepspeed`` that split the same
``GPT`` N ways (tensor parallel; ``load_state_into_model`` slices the full tensors, the
vocabulary-parallel logits are all-gathered, every rank continues with TP rank 0's token).
The export holds full tensors, so a model of any training layout loads here. The prompt is run once to fill the cache; each new token then costs one position
(``GPT.forward(ids, kv_cache=cache)``). When the sequence reaches the model's context
(``n_ctx``) the cache is rebuilt from the last ``n_ctx - 1`` tokens (a sliding window).

Sampling: ``temperature == 0`` is greedy (argmax, what ``transformers`` ``generate(
do_sample=False)`` does); otherwise logits / temperature, then top-k, then top-p (nucleus:
the smallest set of tokens whose probability reaches p), sampled with a seeded generator so
``--seed`` repeats a sample exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt_dist.config import ModelConfig


@dataclass
class LoadedModel:
    model: Any
    cfg: ModelConfig
    eod_id: int | None
    tokenizer: Any = None
    tp: int = 1
    tp_rank: int = 0


def _ensure_parallel_state(device: str) -> tuple[int, int]:
    """megatron-core's layers need its parallel groups even in one process. Under torchrun /
    deepspeed with N processes the model is split N ways (tensor parallel). -> (tp, tp_rank)."""
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        from gpt_dist import rng
        from gpt_dist.config import ParallelConfig
        from gpt_dist.parallel import ParallelContext

        world = int(os.environ.get("WORLD_SIZE", "1"))
        ParallelContext.from_env(ParallelConfig(tp=world), device=device)
        rng.seed_all(0)
    tp = ps.get_tensor_model_parallel_world_size()
    if dist.get_world_size() != tp:
        raise RuntimeError(f"generation runs tensor parallel only: world size {dist.get_world_size()} "
                           f"!= tensor parallel size {tp}")
    return tp, ps.get_tensor_model_parallel_rank()


def load_model(export_dir: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
               with_tokenizer: bool = True) -> LoadedModel:
    """Build a ``GPT`` from an export (TP=1, or this rank's TP slice under torchrun); the
    tokenizer too when the directory has one."""
    import json

    from gpt_dist.export import load_native, load_state_into_model
    from gpt_dist.model.gpt import build_model

    export_dir = Path(export_dir)
    cfg, state = load_native(export_dir)
    tp, tp_rank = _ensure_parallel_state(device)
    model = build_model(cfg, tp=tp)
    load_state_into_model(model, state, tp_rank, tp, cfg)   # this rank's TP slice
    del state
    model = model.to(device=device, dtype=dtype).eval()
    eod: int | None = None
    try:
        conf = json.loads((export_dir / "config.json").read_text())
        eod = conf.get("eod_id", conf.get("eos_token_id"))
    except (OSError, ValueError):
        pass
    tok = None
    if with_tokenizer:
        try:
            from gpt_dist.tokenizer import load_tokenizer

            tok = load_tokenizer(export_dir)
        except Exception:  # no tokenizer in the export: callers use token ids  # noqa: BLE001
            tok = None
        if tok is not None and eod is None:
            eod = tok.eod_id
    return LoadedModel(model, cfg, eod if isinstance(eod, int) else None, tok, tp, tp_rank)


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


def _last_logits(model: Any, cfg: ModelConfig, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """[b, V] logits of the last position; under TP the vocabulary shards are all-gathered."""
    from megatron.core import parallel_state as ps

    out = model(ids, kv_cache=cache)[:, -1]
    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
        import torch.distributed as dist  # (megatron's gather allocates on CUDA)

        parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out[:, : cfg.vocab_size]


def _sync_token(tok: torch.Tensor) -> torch.Tensor:
    """Under TP every rank continues with TP rank 0's token (sampling seeds may differ)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
        import torch.distributed as dist

        tok = tok.contiguous()
        dist.broadcast(tok, ps.get_tensor_model_parallel_src_rank(), group=ps.get_tensor_model_parallel_group())
    return tok


@torch.no_grad()
def generate_ids(model: Any, cfg: ModelConfig, prompt: torch.Tensor, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, eos_id: int | None = None,
                 use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield [b] new token ids, one step at a time. prompt: [b, s] ids (s >= 1).

    Rows that produced ``eos_id`` keep yielding ``eos_id``; the generator stops when every
    row has (or after ``max_new_tokens``)."""
    from gpt_dist.model.kv_cache import KVCache

    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.shape[1] == 0:
        raise ValueError("the prompt must hold at least one token")
    if int(prompt.max()) >= cfg.vocab_size or int(prompt.min()) < 0:
        raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size})")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    seq = prompt[:, -(cfg.n_ctx - 1):].to(device) if prompt.shape[1] >= cfg.n_ctx else prompt.to(device)
    cache = KVCache() if use_cache else None
    logits = _last_logits(model, cfg, seq, cache)
    done = torch.zeros(seq.shape[0], dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        tok = _sync_token(next_token(logits.float(), temperature, top_k, top_p, gen))
        if eos_id is not None:
            tok = torch.where(done, torch.full_like(tok, eos_id), tok)
            done |= tok == eos_id
        yield tok
        if (eos_id is not None and bool(done.all())) or i == max_new_tokens - 1:
            return
        seq = torch.cat([seq, tok[:, None]], dim=1)
        if cache is not None and cache.length < cfg.n_ctx:
            logits = _last_logits(model, cfg, tok[:, None], cache)
        else:  # context full (or no cache): a fresh pass over the last n_ctx - 1 tokens
            seq = seq[:, -(cfg.n_ctx - 1):] if seq.shape[1] >= cfg.n_ctx else seq
            cache = KVCache() if use_cache else None
            logits = _last_logits(model, cfg, seq, cache)


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
    for step in generate_ids(loaded.model, loaded.cfg, prompt, max_new_tokens, eos_id=eos, **sampling):
        for i, t in enumerate(step.tolist()):
            if done[i]:
                continue
            out[i].append(t)
            if on_token is not None:
                on_token(i, t)
            done[i] = eos is not None and t == eos
    return out
