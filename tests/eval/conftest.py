"""Fixtures of the zero-shot evaluation tests: a tiny sentencepiece tokenizer, a tiny GPT-2
trained for a few seconds on a patterned corpus (so LAMBADA-style greedy matches and
multiple-choice answers are neither all right nor all wrong), its native and Hugging Face
exports, and three local task files (LAMBADA, WikiText-style pages, 4-choice).

The model is trained with plain ``transformers`` (GPT2LMHeadModel) and converted with
``gpt_dist.export.from_hf``: the exports then hold weights nobody in gpt_dist computed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "while", "a", "small", "cat", "sleeps",
         "near", "warm", "fire", "and", "people", "read", "good", "books", "about", "rivers", "mountains",
         "cities", "music", "science", "history"]
N_CTX = 64


def pattern(start: int, n: int, stride: int = 3) -> list[str]:
    """Words following the corpus's rule (next word = +stride in WORDS): learnable."""
    return [WORDS[(start + stride * j) % len(WORDS)] for j in range(n)]


def corpus_text(n: int = 400) -> str:
    lines = []
    for i in range(n):
        w = pattern(i * 7, 10 + i % 7)
        lines.append(f"{' '.join(w).capitalize()}. Number {i % 50}, {i * 13 % 97}!\n")
    return "".join(lines)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def task_files(out: Path) -> Path:
    """lambada.jsonl, wikitext.jsonl, hellaswag.jsonl, gen.jsonl under ``out``."""
    import numpy as np

    rs = np.random.RandomState(0)
    out.mkdir(parents=True, exist_ok=True)
    lam = []
    for i in range(40):
        n = 6 + i % 9 if i % 5 else 40 + i  # every 5th context is longer than the model's window
        words = pattern(rs.randint(28), n) if i % 4 else [WORDS[rs.randint(28)] for _ in range(n)]
        lam.append({"text": " ".join(words).capitalize()})
    write_jsonl(out / "lambada.jsonl", lam)
    pages = []
    for i in range(6):
        paras = [" ".join(pattern(rs.randint(28), 8 + rs.randint(12))) + " @-@ " + str(i) + " , ok ." for _ in
                 range(2 + 3 * i)]
        pages.append({"page": " = Title " + str(i) + " = \n" + " \n".join(paras) + " \n"})
    write_jsonl(out / "wikitext.jsonl", pages)
    mc = []
    for i in range(30):
        start = rs.randint(28)
        n = 5 + i % 6 if i % 7 else 45
        ctx = " ".join(pattern(start, n)).capitalize()
        right = " ".join(pattern(start + 3 * n, 2 + i % 3))
        # distractors: random words, or the pattern one step off (plausible to the model)
        wrong = [" ".join(WORDS[rs.randint(28)] for _ in range(1 + rs.randint(4))) if k % 2 else
                 " ".join(pattern(start + 3 * n + 1 + k, 1 + rs.randint(4))) for k in range(3)]
        label = i % 4
        choices = wrong[:label] + [right] + wrong[label:]
        mc.append({"context": ctx, "choices": choices, "label": label})
    write_jsonl(out / "hellaswag.jsonl", mc)
    gen = []
    for i in range(8):
        start = rs.randint(28)
        gen.append({"context": " ".join(pattern(start, 4 + i)).capitalize(),
                    "target": " " + " ".join(pattern(start + 3 * (4 + i), 2))})
    write_jsonl(out / "gen.jsonl", gen)
    return out


@dataclass
class Trained:
    cfg: Any
    state: dict[str, Any]
    native: Path
    hf: Path
    tok_dir: Path
    data: Path


@pytest.fixture(scope="session")
def eval_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="session")
def trained(eval_tmp: Path) -> Trained:
    return make_trained(eval_tmp)


def make_trained(eval_tmp: Path) -> Trained:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt_dist.config import ModelConfig
    from gpt_dist.export import export_state, from_hf
    from gpt_dist.tokenizer import train_tokenizer

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    corpus = eval_tmp / "corpus.txt"
    corpus.write_text(corpus_text(), encoding="utf-8")
    tok = train_tokenizer([corpus], 320, eval_tmp / "tok", num_threads=1)
    ids = [t for line in corpus.read_text().splitlines(keepends=True) for t in tok.encode(line) + [tok.eod_id]]
    data = torch.tensor(ids)
    torch.manual_seed(0)
    hf_cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=N_CTX, vocab_size=tok.vocab_size,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
                        bos_token_id=tok.eod_id, eos_token_id=tok.eod_id)
    model = GPT2LMHeadModel(hf_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(data) - N_CTX - 1, (16,), generator=g)
        batch = torch.stack([data[s: s + N_CTX] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    cfg = ModelConfig(arch="gpt2", n_layer=2, n_head=2, n_embd=32, n_ctx=N_CTX, vocab_size=tok.vocab_size,
                      make_vocab_size_divisible_by=8, dropout=0.0, attn_dropout=0.0)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = from_hf(sd, cfg)
    native = export_state(state, cfg, eval_tmp / "export_native", tokenizer_dir=eval_tmp / "tok")
    hf = export_state(state, cfg, eval_tmp / "export_hf", fmt="hf", tokenizer_dir=eval_tmp / "tok")
    return Trained(cfg, state, native, hf, eval_tmp / "tok", task_files(eval_tmp / "tasks"))


@pytest.fixture(scope="session")
def ctx():
    """World size 1, TP=1 on CPU in the test process (megatron-core's groups exist)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from gpt_dist import rng
    from gpt_dist.eval.model import parallel_context

    c = parallel_context(1, 1, "cpu")
    rng.seed_all(0)
    return c
