#!/usr/bin/env python
"""Training-step throughput: gpt_dist under DeepSpeed vs the same model in a plain loop vs
Hugging Face ``GPT2LMHeadModel`` in a plain loop; same shape, batch, precision, in one run.

    python bench/train_bench.py [--n-layer 4 --n-embd 256 --seq 256 --batch 8 --steps 10]

Prints tokens/s (and MFU where the device's peak is known) for the three, their ratios, and
appends them to BENCHMARKS.md with the machine's description. Targets (issue #3): gpt_dist
>= 1.0x the Hugging Face loop; DeepSpeed's overhead <= 10% over the plain loop of our model.
The three contenders run interleaved (round-robin, best of --repeats) so that a machine whose
speed drifts during the run does not favour whichever ran first.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _machine import cpu_name  # bench/ is on sys.path when a bench script runs

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    cpu = cpu_name()
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {dev}, torch {torch.__version__}"


def timed(step: Callable[[], None], steps: int, warmup: int) -> float:
    """Seconds per step (median of ``steps`` after ``warmup``)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()

    from gpt_dist.config import (
        Config,
        DataConfig,
        ModelConfig,
        OptimizerConfig,
        ParallelConfig,
        ScheduleConfig,
        TrainingConfig,
    )
    from gpt_dist.model.build import build_gpt
    from gpt_dist.parallel import ParallelContext
    from gpt_dist.rng import seed_all
    from gpt_dist.training.engine import build_engine
    from gpt_dist.training.loop import train_step
    from gpt_dist.training.metrics import flops_per_token, peak_tflops
    from gpt_dist.training.pretrain import LMObjective

    cuda = torch.cuda.is_available()
    precision = "bf16" if cuda else "fp32"
    mcfg = ModelConfig(arch="gpt2", n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                       n_ctx=args.seq, vocab_size=args.vocab, dropout=0.0, attn_dropout=0.0)
    cfg = Config(model=mcfg, parallel=ParallelConfig(),
                 optimizer=OptimizerConfig(lr=1e-4, weight_decay=0.1),
                 schedule=ScheduleConfig(warmup_steps=1, decay="constant"),
                 data=DataConfig(seq_len=args.seq),
                 training=TrainingConfig(micro_batch_size=args.batch, global_batch_size=args.batch,
                                         precision=precision, device="cuda" if cuda else "cpu"),
                 deepspeed={"zero_optimization": {"stage": 1}})
    ctx = ParallelContext.from_env(cfg.parallel, device=cfg.training.device)
    seed_all(1)
    dev = ctx.device
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen).to(dev)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
             "loss_mask": torch.ones(args.batch, args.seq, device=dev)}
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    # 1. gpt_dist's training step under DeepSpeed (what launch/pretrain.py runs)
    eng = build_engine(cfg, ctx)
    objective = LMObjective(cfg, ctx, datasets=None)  # the batch is given; no dataset is read
    def ds_step() -> None:
        train_step(cfg, ctx, eng, objective, iter([batch]))

    # 2. the same model in a plain PyTorch loop
    plain = build_gpt(mcfg, seed=1).to(dev, dtype)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, fused=cuda)
    def plain_step() -> None:
        loss = plain(batch["tokens"], batch["labels"], batch["loss_mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    # 3. Hugging Face GPT2LMHeadModel, same shape, SDPA attention
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.n_embd,
                                    n_layer=args.n_layer, n_head=args.n_head, resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                    eos_token_id=0, attn_implementation="sdpa")).to(dev, dtype)
    hopt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=cuda)
    def hf_step() -> None:
        out = hf(input_ids=batch["tokens"])
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]),
                                                 batch["labels"].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hopt.step()
        hopt.zero_grad(set_to_none=True)

    contenders = {"gpt_dist + DeepSpeed": ds_step, "gpt_dist plain loop": plain_step,
                  "HF GPT2LMHeadModel loop": hf_step}
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            best[name] = min(best.get(name, float("inf")), timed(fn, args.steps, args.warmup))

    ntok = args.batch * args.seq
    fpt = flops_per_token(cfg.model, cfg.parallel, cfg.sequence_length)
    peak = peak_tflops(cfg.logging, cfg.training, dev)
    lines = []
    for name, sec in best.items():
        tok_s = ntok / sec
        tflops = fpt * tok_s / 1e12
        mfu = f"{tflops / peak:.1%}" if peak else "n/a (no known peak)"
        lines.append(f"| {name} | {sec * 1e3:.1f} | {tok_s:,.0f} | {tflops:.3f} | {mfu} |")
    ds, pl, hfs = (best[k] for k in contenders)
    summary = (f"- gpt_dist (DeepSpeed) vs HF loop: **{hfs / ds:.2f}x** throughput (target >= 1.0x)\n"
               f"- DeepSpeed overhead over our plain loop: **{(ds / pl - 1):+.1%}** (target <= +10%)\n"
               f"- our plain loop vs HF loop: {hfs / pl:.2f}x")
    table = ("| contender | ms/step | tokens/s | TFLOP/s | MFU |\n|---|---|---|---|---|\n"
             + "\n".join(lines))
    shape = (f"GPT-2 shape: {args.n_layer} layers, {args.n_embd} wide, {args.n_head} heads, vocab "
             f"{args.vocab}, seq {args.seq}, batch {args.batch}, {precision}, AdamW, clip 1.0; "
             f"median of {args.steps} steps after {args.warmup} warm-up, best of {args.repeats} "
             f"interleaved rounds; FLOPs per token {fpt / 1e6:.1f} M (Megatron formula, README)")
    report = f"\n## Training step ({time.strftime('%Y-%m-%d')})\n\nMachine: {machine()}\n\n{shape}\n\n{table}\n\n{summary}\n"
    print(report)
    if not args.no_append:
        with open(ROOT / "BENCHMARKS.md", "a") as fh:
            fh.write(report)


if __name__ == "__main__":
    main()
