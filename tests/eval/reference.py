"""An independent reference for the built-in metrics: lm-eval's definitions written out
plainly over ``transformers``' GPT2LMHeadModel and tokenizer loaded from the Hugging Face
export, one request at a time (no batching, no padding, no cache, no TP).

Rolling windows are formulated differently from ``gpt_dist.eval.scoring.rolling_windows``
(by the last predicted position of each window, over ``[prefix] + tokens``) so a shared
mistake in the window arithmetic cannot cancel out.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch


class HFReference:
    def __init__(self, hf_dir: Path) -> None:
        from transformers import AutoTokenizer, GPT2LMHeadModel

        self.tok = AutoTokenizer.from_pretrained(str(hf_dir))
        self.model = GPT2LMHeadModel.from_pretrained(str(hf_dir)).eval()
        self.L = self.model.config.n_positions
        self.prefix = self.tok.eos_token_id

    def enc(self, s: str) -> list[int]:
        return self.tok.encode(s, add_special_tokens=False)

    @torch.no_grad()
    def _logprobs(self, inp: list[int]) -> torch.Tensor:
        return torch.log_softmax(self.model(torch.tensor([inp])).logits[0].float(), dim=-1)

    def loglikelihood(self, ctx: str, cont: str) -> tuple[float, bool, float]:
        """(ll, all greedy, smallest top-1 minus top-2 log-prob over the scored positions)."""
        n = len(ctx) - len(ctx.rstrip())
        if n:
            ctx, cont = ctx[:-n], ctx[-n:] + cont
        c = self.enc(ctx)
        k = self.enc(ctx + cont)[len(c):]
        full = (c + k)[-(self.L + 1):]
        lp = self._logprobs(full[:-1])[-len(k):]
        target = torch.tensor(k)
        top2 = lp.topk(2, dim=-1).values
        return (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()),
                float((top2[:, 0] - top2[:, 1]).min()))

    def rolling(self, text: str) -> tuple[float, int]:
        toks = self.enc(text)
        seq = [self.prefix] + toks                # seq[i + 1] = toks[i]
        total, p = 0.0, 0
        while p < len(toks):
            end = min(p + self.L, len(toks))      # predict toks[p:end] = seq[p+1:end+1]
            start = max(0, end - self.L)          # the window seq[start:end], the longest that fits
            lp = self._logprobs(seq[start:end])
            n = end - p
            total += float(lp[-n:].gather(1, torch.tensor(seq[p + 1:end + 1])[:, None]).sum())
            p = end
        return total, len(toks)


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reference(ref: HFReference, tasks: Path, detok: Any) -> dict[str, Any]:
    """Per-example values and metrics of lambada.jsonl, wikitext.jsonl, hellaswag.jsonl."""
    out: dict[str, Any] = {}
    lam = [ref.loglikelihood(" ".join(d["text"].split(" ")[:-1]), " " + d["text"].split(" ")[-1])
           for d in read(tasks / "lambada.jsonl")]
    lls = [x[0] for x in lam]
    out["lambada"] = {"ll": lls, "greedy": [x[1] for x in lam], "margin": min(x[2] for x in lam),
                      "acc": sum(x[1] for x in lam) / len(lam), "perplexity": math.exp(-sum(lls) / len(lls))}
    pages = [d["page"] for d in read(tasks / "wikitext.jsonl")]
    rolled = [ref.rolling(detok(p)) for p in pages]
    ll = sum(r[0] for r in rolled)
    words = sum(len(re.split(r"\s+", p)) for p in pages)
    nbytes = sum(len(p.encode()) for p in pages)
    out["wikitext"] = {"ll": [r[0] for r in rolled], "word_perplexity": math.exp(-ll / words),
                       "byte_perplexity": math.exp(-ll / nbytes), "bits_per_byte": -ll / nbytes / math.log(2),
                       "token_perplexity": math.exp(-ll / sum(r[1] for r in rolled))}
    acc, norm, gaps, all_lls = [], [], [], []
    for d in read(tasks / "hellaswag.jsonl"):
        lls = [ref.loglikelihood(d["context"], " " + c)[0] for c in d["choices"]]
        all_lls.append(lls)
        normed = [x / len(c) for x, c in zip(lls, d["choices"], strict=True)]
        for v in (lls, normed):
            s = sorted(v)
            gaps.append(s[-1] - s[-2])
        acc.append(float(max(range(len(lls)), key=lambda i: lls[i]) == d["label"]))
        norm.append(float(max(range(len(lls)), key=lambda i: normed[i]) == d["label"]))
    out["hellaswag"] = {"lls": all_lls, "acc": sum(acc) / len(acc), "acc_norm": sum(norm) / len(norm),
                        "margin": min(gaps)}
    return out
