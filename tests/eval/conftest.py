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
    """World size 1, TP=1 on CPU in the test process (megatron-core's groups exist),
    destroyed at the end of the session."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from gpt_dist.inference import open_context

    with open_context(1, 1, "cpu") as c:
        yield c


# --------------------------------------------------------------------------- a run directory
OVERLAP_PLANTED = (1, 4, 6, 9, 10)   # rows of overlap.jsonl copied into the training shard


@dataclass
class Run:
    dir: Path
    shard: Path
    overlap_task: Path


def overlap_task(out: Path) -> Path:
    """Twelve texts of random words (no 8-gram of them occurs by chance in the corpus)."""
    import numpy as np

    rs = np.random.RandomState(11)
    rows = [{"text": " ".join(WORDS[rs.randint(28)] for _ in range(14 + i % 5)).capitalize()} for i in range(12)]
    return write_jsonl(out / "overlap.jsonl", rows)


@pytest.fixture(scope="session")
def train_shard(trained: Trained, eval_tmp: Path) -> tuple[Path, Path]:
    """(one shard of the corpus in the project's tokenizer, into which five rows of
    ``overlap.jsonl`` are planted; that task file)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from gpt_dist.tokenizer import load_tokenizer

    tok = load_tokenizer(trained.tok_dir)
    task = overlap_task(eval_tmp)
    planted = [json.loads(line)["text"] for i, line in enumerate(task.read_text().splitlines())
               if i in OVERLAP_PLANTED]
    shard = eval_tmp / "shards" / "corpus_00000"
    shard.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(str(shard) + ".bin", dtype=np.uint16)
    lines = corpus_text().splitlines(keepends=True)
    for i, text in enumerate(lines):
        if i % 80 == 0 and planted:
            text = "Some words before. " + planted.pop() + " And after.\n"
        ids = tok.encode(text) + [tok.eod_id]
        builder.add_document(np.array(ids, dtype=np.uint16), [len(ids)])
    builder.finalize(str(shard) + ".idx")
    return shard, task


def _pretrain(trained: Trained, shard: Path, run: Path, config: Path, nproc: int = 1,
              **sections: dict[str, Any]) -> None:
    """A short pretraining run initialised from the trained export (``sections`` update the
    base config's sections)."""
    from tests import helpers

    cfg = helpers.toy_config_dict(  # configs/tiny_cpu.json with these changes
        run, [shard], tokenizer=trained.tok_dir,
        run={"name": run.name},
        model={"n_layer": 2, "n_head": 2, "n_embd": 32, "n_ctx": N_CTX, "vocab_size": trained.cfg.vocab_size,
               "make_vocab_size_divisible_by": 8, "dropout": 0.0, "attn_dropout": 0.0},
        optimizer={"lr": 1e-3},
        schedule={"warmup_steps": 1, "decay": "constant"},
        data={"seq_len": 32},
        training={"train_steps": 4, "micro_batch_size": 2, "global_batch_size": 4, "eval_interval": 4,
                  "eval_steps": 1},
        checkpoint={"save_interval": 2, "keep_last": 3, "init_from": str(trained.native)},
        logging={"log_interval": 1, "tensorboard": False},
    )
    for name, values in sections.items():
        cfg[name].update(values)
    path = helpers.write_config(config, cfg)
    script = helpers.ROOT / "launch" / "pretrain.py"
    cmd = helpers.torchrun_cmd(script, "--config", path, nproc=nproc) if nproc > 1 else \
        helpers.python_cmd(script, "--config", path)
    res = helpers.run(cmd, env=helpers.child_env(GPT_DIST_PG_TIMEOUT="300"), timeout=400,
                      log=config.with_suffix(".log"))
    assert res.rc == 0, res.describe()


@pytest.fixture(scope="session")
def run_dir(trained: Trained, eval_tmp: Path, train_shard: tuple[Path, Path]) -> Run:
    """A 4-step pretraining run (checkpoints at steps 2 and 4) initialised from the trained
    export, on ``train_shard``; zero-shot tasks (``training.eval_tasks``) at step 4."""
    shard, task = train_shard
    run = eval_tmp / "run"
    _pretrain(trained, shard, run, eval_tmp / "run.json",
              training={"eval_tasks": ["lambada", "hellaswag"], "eval_tasks_dir": str(trained.data),
                        "eval_tasks_limit": 10})
    return Run(run, shard, task)


@pytest.fixture(scope="session")
def zero3_run(trained: Trained, eval_tmp: Path, train_shard: tuple[Path, Path]) -> Path:
    """A 2-step ZeRO-3 run over two data-parallel ranks (parameters really partitioned:
    ``helpers.zero3``), its checkpoint at step 2; zero-shot tasks (``training.eval_tasks``)
    evaluated at step 2 on the partitioned model."""
    from tests import helpers

    run = eval_tmp / "run_zero3"
    _pretrain(trained, train_shard[0], run, eval_tmp / "run_zero3.json", nproc=2,
              training={"train_steps": 2, "eval_interval": 2, "eval_tasks": ["lambada", "hellaswag"],
                        "eval_tasks_dir": str(trained.data), "eval_tasks_limit": 10},
              deepspeed={"zero_optimization": helpers.zero3()})
    return run
