#!/usr/bin/env python
"""Model FLOPs utilisation on one GPU: gpt_dist with its fused kernels vs with them off vs
Hugging Face ``GPT2LMHeadModel`` in a plain bf16 loop (SDPA attention, fused AdamW).

    python bench/mfu_bench.py                                  # GPU: gpt2_124m, gpt2_355m, gpt2_1.5b
    python bench/mfu_bench.py --models gpt2_124m --compile     # also torch.compile of the blocks
    python bench/mfu_bench.py --tiny --device cpu --out /tmp/m # CPU smoke of every code path

Per model (configs/<name>.json, context 1024, bf16, dropout 0 as nanoGPT's and llm.c's
figures, ZeRO-1 on one GPU, activation checkpointing only where --ac says): tokens/s,
TFLOP/s, MFU against the dense bf16 peak (989 TFLOP/s for H100 SXM and H200) and against a
bf16 8192^3 matmul timed in the same run, peak memory (torch.cuda.max_memory_allocated) beside
the dry run's estimate for the same layout and kernels.

FLOP conventions (README "Kernels"; PAPERS_AND_NUMBERS.md):
* F_token = 72 l h^2 + 12 l h s + 6 h V (Megatron 2021 / nanoGPT: non-causal attention,
  padded vocabulary): the MFU reported first; the same formula the trainer logs;
* llm.c: 6 N + 6 l h s (causal attention halved, N all parameters, padded vocabulary);
* HFU adds what recomputation runs again (a forward of every recomputed block,
  24 l h^2 + 4 l h s per token), counted separately, never in MFU.

Results go to OUT/mfu.json and OUT/mfu.md; on a GPU the table is also appended to
BENCHMARKS.md (--no-append to skip). A CPU run is a smoke test of the code, never a GPU figure,
and is not appended. The contenders run one after another (each freed before the next) so
each one's peak memory is its own.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _machine import cpu_name

PEAK_BF16 = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
MICRO_BATCH = {"gpt2_124m": 16, "gpt2_355m": 16, "gpt2_774m": 8, "gpt2_1.5b": 8}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(step: Callable[[], None], steps: int, warmup: int, dev: torch.device) -> float:
    """Median seconds per step of ``steps`` after ``warmup``."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(dev)
        t0 = time.perf_counter()
        step()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_tflops(dev: torch.device, n: int) -> float:
    """bf16 (fp32 on CPU) n^3 matmul rate: mean of 10 after 3 warm-ups."""
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(dev)
    return 2 * n**3 * 10 / (time.perf_counter() - t0) / 1e12


def flop_counts(cfg: Any) -> dict[str, float]:
    """Per-token training FLOPs in the three conventions (module docstring)."""
    from gpt_dist.model.gpt import analytic_parameters

    m = cfg.model
    l, h, s, v = m.n_layer, m.n_embd, cfg.data.seq_len, m.padded_vocab_size(1)
    n_all = analytic_parameters(m) + (v - m.vocab_size) * h
    recompute = 0.0
    if cfg.parallel.activation_checkpointing == "full":
        share = -(-l // cfg.parallel.checkpoint_every) / l if cfg.parallel.checkpoint_every > 1 else 1.0
        recompute = share * (24 * l * h * h + 4 * l * h * s)
    mfu = 72 * l * h * h + 12 * l * h * s + 6 * h * v
    return {"megatron": mfu, "llmc": 6 * n_all + 6 * l * h * s, "hfu": mfu + recompute}


def project_cfg(name: str, args: argparse.Namespace, kernels: dict[str, str]) -> Any:
    from gpt_dist.config import load_config

    dev = args.device
    over = [f"data.seq_len={args.seq}", f"training.micro_batch_size={args.batch or MICRO_BATCH.get(name, 8)}",
            f"training.global_batch_size={args.batch or MICRO_BATCH.get(name, 8)}",
            f"training.precision={'bf16' if dev == 'cuda' else 'fp32'}", f"training.device={dev}",
            f"model.dropout={args.dropout}", f"model.attn_dropout={args.dropout}",
            "logging.tensorboard=false", "logging.progress_bar=false"]
    over += [f"kernels.{k}={v}" for k, v in kernels.items()]
    if args.ac:
        over.append("parallel.activation_checkpointing=full")
    if args.tiny:
        over += ["model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.vocab_size=509",
                 f"model.n_ctx={args.seq}"]
    cfg = load_config(ROOT / "configs" / f"{name}.json", over)
    cfg.deepspeed = {"zero_optimization": {"stage": 1}}  # one GPU: model states whole, no gathering
    return cfg


def dry_run_estimate_gb(cfg: Any) -> float:
    """What ``--dry-run`` plans for this run on one device (model states + activations +
    output layer), in GiB to compare with torch.cuda.max_memory_allocated."""
    from gpt_dist.dryrun import activation_bytes, memory_per_gpu, output_layer_bytes, stage_parameters

    (st,) = stage_parameters(cfg.model, cfg.parallel)
    mem = memory_per_gpu(st.per_rank, 1, zero_stage=cfg.zero_stage, precision=cfg.training.precision)
    states = mem["model_states"] * 1e9
    return (states + activation_bytes(cfg)[0] + output_layer_bytes(cfg)[0]) / 2**30


def run_project(cfg: Any, ctx: Any, args: argparse.Namespace) -> dict[str, Any]:
    """gpt_dist's training step under DeepSpeed (what launch/pretrain.py runs)."""
    from gpt_dist.config import kernels_for
    from gpt_dist.rng import seed_all
    from gpt_dist.training.engine import build_engine
    from gpt_dist.training.loop import train_step
    from gpt_dist.training.pretrain import LMObjective

    seed_all(1)
    eng = build_engine(cfg, ctx)
    objective = LMObjective(cfg, ctx, datasets=None)
    batch = _batch(cfg.training.micro_batch_size, args.seq, cfg.model.vocab_size, ctx.device)
    losses: list[float] = []

    def step() -> None:
        losses.append(train_step(cfg, ctx, eng, objective, iter([batch]))[0])

    sec = timed(step, args.steps, args.warmup, ctx.device)
    out = {"sec": sec, "kernels": kernels_for(cfg, ctx.device.type).names_on(), "loss_last": losses[-1],
           "optimizer": type(eng.optimizer).__name__}
    return out


def run_hf(cfg: Any, ctx: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Hugging Face GPT2LMHeadModel, same shape, bf16 weights, SDPA, torch's fused AdamW."""
    from transformers import GPT2Config, GPT2LMHeadModel

    m, dev = cfg.model, ctx.device
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(1)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=m.vocab_size, n_positions=m.n_ctx, n_embd=m.n_embd,
                                    n_layer=m.n_layer, n_head=m.n_head, resid_pdrop=args.dropout,
                                    embd_pdrop=args.dropout, attn_pdrop=args.dropout, bos_token_id=0,
                                    eos_token_id=0, attn_implementation="sdpa")).to(dev, dtype)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1, fused=cuda)
    batch = _batch(cfg.training.micro_batch_size, args.seq, m.vocab_size, dev)
    losses: list[float] = []

    def step() -> None:
        logits = hf(input_ids=batch["tokens"]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]),
                                                 batch["labels"].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    sec = timed(step, args.steps, args.warmup, dev)
    return {"sec": sec, "kernels": ["sdpa (auto)", "torch fused AdamW" if cuda else "torch AdamW"],
            "loss_last": losses[-1], "optimizer": "AdamW"}


def _batch(b: int, s: int, vocab: int, dev: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (b, s + 1), generator=g).to(dev)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(b, s, device=dev)}


def measure(name: str, contender: str, args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    kernels = {"project": {k: args.kernels for k in ("layernorm", "bias_gelu", "bias_dropout_add",
                                                     "cross_entropy", "flash_attention", "fused_adam")},
               "project_off": {k: "off" for k in ("layernorm", "bias_gelu", "bias_dropout_add", "cross_entropy",
                                                  "flash_attention", "fused_adam", "compile")},
               "project_compile": {"compile": "on", "layernorm": "off", "bias_gelu": "off",
                                   "bias_dropout_add": "off"},
               "hf": {}}[contender]
    cfg = project_cfg(name, args, kernels)
    dev = ctx.device
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        res = run_hf(cfg, ctx, args) if contender == "hf" else run_project(cfg, ctx, args)
    except torch.OutOfMemoryError as exc:
        res = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
    except Exception as exc:  # noqa: BLE001 - one failing contender must not lose the others' figures
        res = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}
    gc.collect()
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    tokens = cfg.training.micro_batch_size * args.seq
    flops = flop_counts(cfg)
    res.update(model=name, contender=contender, micro_batch=cfg.training.micro_batch_size, seq=args.seq,
               ac=args.ac, peak_mem_gib=peak, flops_per_token=flops,
               dry_run_gib=dry_run_estimate_gb(cfg) if contender != "hf" else None)
    if "sec" in res:
        res["tokens_per_s"] = tokens / res["sec"]
        res["tflops"] = flops["megatron"] * res["tokens_per_s"] / 1e12
        res["tflops_llmc"] = flops["llmc"] * res["tokens_per_s"] / 1e12
        res["hfu_tflops"] = flops["hfu"] * res["tokens_per_s"] / 1e12
    print(json.dumps({k: v for k, v in res.items() if k != "flops_per_token"}), flush=True)
    return res


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    peak, mm = meta["peak_tflops"], meta["matmul_tflops"]
    head = ("| model | contender | micro-batch | tokens/s | TFLOP/s | MFU (peak) | MFU (matmul) | "
            "TFLOP/s llm.c | HFU TFLOP/s | peak mem GiB | dry-run GiB | kernels |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in results:
        if "error" in r:
            rows.append(f"| {r['model']} | {r['contender']} | {r['micro_batch']} | {r['error']} |" + " |" * 8)
            continue
        mfu = f"{r['tflops'] / peak:.1%}" if peak else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        dry = f"{r['dry_run_gib']:.1f}" if r["dry_run_gib"] is not None else "-"
        rows.append(f"| {r['model']} | {r['contender']} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | "
                    f"{r['tflops']:.1f} | {mfu} | {r['tflops'] / mm:.1%} | {r['tflops_llmc']:.1f} | "
                    f"{r['hfu_tflops']:.1f} | {mem} | {dry} | {', '.join(r['kernels'])} |")
    ratios = []
    by = {(r["model"], r["contender"]): r for r in results if "sec" in r}
    for model in dict.fromkeys(r["model"] for r in results):
        p, hf, off = by.get((model, "project")), by.get((model, "hf")), by.get((model, "project_off"))
        if p and hf:
            ratios.append(f"- {model}: kernels on vs HF loop **{p['tokens_per_s'] / hf['tokens_per_s']:.2f}x** "
                          f"(target >= 1.3x)" + (f"; vs kernels off {p['tokens_per_s'] / off['tokens_per_s']:.2f}x"
                                                  if off else ""))
    note = "" if meta["device"] == "cuda" else "\n**CPU smoke run: these are not GPU figures.**\n"
    return (f"\n## MFU on one GPU ({meta['date']})\n{note}\nMachine: {meta['machine']}; measured "
            f"{'bf16' if meta['device'] == 'cuda' else 'fp32'} {meta['matmul_n']}^3 matmul: **{mm:.0f} TFLOP/s**; peak used for MFU: {peak or 'n/a'} TFLOP/s.\n\n"
            f"Context {meta['seq']}, dropout {meta['dropout']}, ZeRO-1 on one device, median of {meta['steps']} "
            f"steps after {meta['warmup']} warm-up. TFLOP/s = F_token (72lh^2 + 12lhs + 6hV) x tokens/s; "
            f"llm.c column: 6N + 6lhs; HFU adds recomputation.\n\n" + head + "\n".join(rows) + "\n\n"
            + "\n".join(ratios) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2_124m,gpt2_355m,gpt2_1.5b")
    ap.add_argument("--contenders", default="project,project_off,hf")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the blocks")
    ap.add_argument("--compile-models", default="", help="with --compile: only these models (default: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--kernels", default="auto", choices=["auto", "on"], help="the project contender's kernels")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=0, help="micro-batch (default: per model)")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--ac", action="store_true", help="full activation checkpointing")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="2-layer 64-wide models: a smoke run of the code")
    ap.add_argument("--out", default=str(ROOT / "runs" / "mfu_bench"))
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    if args.tiny:
        args.seq = min(args.seq, 64)
        args.batch = args.batch or 2
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)

    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from gpt_dist.config import ParallelConfig
    from gpt_dist.parallel import ParallelContext

    ctx = ParallelContext.from_env(ParallelConfig(), device=args.device)
    dev = ctx.device
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "no GPU"
    mm_n = 8192 if dev.type == "cuda" else 512
    meta = {"date": time.strftime("%Y-%m-%d"), "device": dev.type, "gpu": gpu, "seq": args.seq,
            "machine": f"{gpu}, {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "matmul_n": mm_n, "matmul_tflops": matmul_tflops(dev, mm_n), "steps": args.steps,
            "warmup": args.warmup, "dropout": args.dropout,
            "peak_tflops": next((v for k, v in PEAK_BF16.items() if k in gpu), None)}
    compiled = args.compile_models.split(",") if args.compile_models else args.models.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for name in args.models.split(","):
        for c in args.contenders.split(",") + (["project_compile"] if args.compile and name in compiled else []):
            results.append(measure(name, c, args, ctx))
            # written after every measurement: a run stopped by its time limit keeps what it measured
            (out / "mfu.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
            (out / "mfu.md").write_text(markdown(results, meta))
    text = markdown(results, meta)
    print(text)
    if dev.type == "cuda" and not args.no_append:
        with open(ROOT / "BENCHMARKS.md", "a") as fh:
            fh.write(text)
    ctx.destroy()


if __name__ == "__main__":
    main()
