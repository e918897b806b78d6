#!/usr/bin/env python
"""Fine-tuning throughput: gpt_dist's GPT-1 fine-tuning step (DeepSpeed engine, the task head,
L3 = L2 + lambda L1) vs a plain PyTorch loop over Hugging Face's ``GPT2DoubleHeadsModel`` (LM
head + multiple-choice head: the same objective), same shape, batch and precision, one run.

    python bench/finetune_bench.py [--n-layer 4 --n-embd 256 --seq 128 --batch 8 --choices 4]

Prints examples/s of both and their ratio (target >= 1.0x, issue 12) and appends them to
BENCHMARKS.md with the machine. Contenders run interleaved (round-robin, best of --repeats)
so a machine whose speed drifts does not favour whichever ran first.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from train_bench import machine, timed  # bench/ is on sys.path when a bench script runs

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="examples per step")
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--lm-coef", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()

    from gpt_dist.config import (
        Config,
        DataConfig,
        FinetuneConfig,
        ModelConfig,
        OptimizerConfig,
        ParallelConfig,
        ScheduleConfig,
        TrainingConfig,
    )
    from gpt_dist.finetune.objective import TaskObjective
    from gpt_dist.finetune.tasks import Example, TaskSpec
    from gpt_dist.parallel import ParallelContext
    from gpt_dist.rng import seed_all
    from gpt_dist.training.engine import build_engine
    from gpt_dist.training.loop import train_step

    cuda = torch.cuda.is_available()
    precision = "bf16" if cuda else "fp32"
    b, k, s = args.batch, args.choices, args.seq
    mcfg = ModelConfig(arch="gpt2", n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                       n_ctx=s, vocab_size=args.vocab, dropout=0.0, attn_dropout=0.0)
    ft = FinetuneConfig(task="multiple_choice", train_file="-", lm_coef=args.lm_coef, classifier_dropout=0.0,
                        num_choices=k, max_len=s)
    cfg = Config(model=mcfg, parallel=ParallelConfig(), optimizer=OptimizerConfig(lr=1e-4, weight_decay=0.01),
                 schedule=ScheduleConfig(warmup_steps=1, decay="constant"), data=DataConfig(seq_len=s),
                 training=TrainingConfig(micro_batch_size=b, global_batch_size=b, precision=precision,
                                         device="cuda" if cuda else "cpu"),
                 deepspeed={"zero_optimization": {"stage": 1}}, finetune=ft)
    ctx = ParallelContext.from_env(cfg.parallel, device=cfg.training.device)
    seed_all(1)
    dev = ctx.device
    rs = np.random.RandomState(0)
    # full-length sequences (no padding), so both contenders do exactly the same work
    examples = [Example([rs.randint(5, args.vocab, size=s).astype(np.int32) for _ in range(k)],
                        int(rs.randint(k)), i + 1, False) for i in range(b)]
    spec = TaskSpec(task="multiple_choice", num_labels=k, max_len=s)

    # 1. gpt_dist's fine-tuning step (what launch/finetune.py runs)
    eng = build_engine(cfg, ctx)
    objective = TaskObjective(cfg, ctx, spec, examples, None, pad_id=0)
    def ds_step() -> None:
        train_step(cfg, ctx, eng, objective, objective.micro_batches(0, 0))

    # 2. Hugging Face GPT2DoubleHeadsModel in a plain loop: LM loss + multiple-choice loss
    from transformers import GPT2Config, GPT2DoubleHeadsModel

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    hf = GPT2DoubleHeadsModel(GPT2Config(vocab_size=args.vocab, n_positions=s, n_embd=args.n_embd,
                                         n_layer=args.n_layer, n_head=args.n_head, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                                         bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")).to(dev, dtype)
    hopt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.01, fused=cuda)
    ids = torch.from_numpy(np.stack([np.stack(e.sequences) for e in examples])).long().to(dev)  # [b, k, s]
    mc_ids = torch.full((b, k), s - 1, dtype=torch.long, device=dev)
    mc_labels = torch.tensor([e.label for e in examples], device=dev)
    def hf_step() -> None:
        out = hf(input_ids=ids, mc_token_ids=mc_ids, labels=ids, mc_labels=mc_labels)
        loss = out.mc_loss + args.lm_coef * out.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hopt.step()
        hopt.zero_grad(set_to_none=True)

    contenders = {"gpt_dist fine-tuning (DeepSpeed)": ds_step, "HF GPT2DoubleHeadsModel loop": hf_step}
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            best[name] = min(best.get(name, float("inf")), timed(fn, args.steps, args.warmup))
    lines = [f"| {n} | {sec * 1e3:.1f} | {b / sec:,.1f} | {b * k * s / sec:,.0f} |" for n, sec in best.items()]
    ours, theirs = best["gpt_dist fine-tuning (DeepSpeed)"], best["HF GPT2DoubleHeadsModel loop"]
    table = "| contender | ms/step | examples/s | tokens/s |\n|---|---|---|---|\n" + "\n".join(lines)
    shape = (f"Multiple choice, {k} choices x {s} tokens, {b} examples per step; GPT-2 shape {args.n_layer} "
             f"layers, {args.n_embd} wide, {args.n_head} heads, vocab {args.vocab}; {precision}; AdamW, clip 1.0; "
             f"L3 = L2 + {args.lm_coef} L1; median of {args.steps} steps after {args.warmup} warm-up, best of "
             f"{args.repeats} interleaved rounds")
    report = (f"\n## Fine-tuning step ({time.strftime('%Y-%m-%d')})\n\nMachine: {machine()}\n\n{shape}\n\n{table}\n\n"
              f"- gpt_dist vs HF GPT2DoubleHeadsModel loop: **{theirs / ours:.2f}x** examples/s (target >= 1.0x)\n")
    print(report)
    if not args.no_append:
        with open(ROOT / "BENCHMARKS.md", "a") as fh:
            fh.write(report)


if __name__ == "__main__":
    main()
