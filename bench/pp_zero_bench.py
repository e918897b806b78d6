#!/usr/bin/env python
"""Pipeline parallelism under ZeRO-1/2/3 (issue 20): PP=2 x DP=2 on 4 CPU ranks (gloo), the real
trainer, every layout side by side in one run.

    python bench/pp_zero_bench.py [--quick] [--models tiny,small] [--layouts z1-ds,z1-stages,z2,z3]
                                  [--warmup 3 --steps 8 --repeats 1] [--no-append]

Layouts (``parallel.pipeline_engine``, ``deepspeed.zero_optimization``):

* ``z1-ds``: ZeRO-1 under DeepSpeed's ``PipelineEngine`` (the path before issue 20);
* ``z1-stages``: ZeRO-1 under the stages engine (``gpt_dist/training/stages.py``: one
  DeepSpeed engine per stage driven by ``torch.distributed.pipelining``'s 1F1B);
* ``z2``, ``z3``: ZeRO-2 and ZeRO-3 under the stages engine. ZeRO-3 partitions every
  parameter (``stage3_param_persistence_threshold: 0``), as a model that needs ZeRO-3 would;
* not run unless named: ``z3-default``, ZeRO-3 with DeepSpeed's default persistence threshold
  (1e5 elements: the small tensors kept whole on every rank, never gathered); ``z3-gpipe``,
  ZeRO-3 under ``parallel.pipeline_schedule: "gpipe"``; ``z3-live1m``, ZeRO-3 with at most 1e6
  parameter elements gathered at once and a 5e5 prefetch bucket (DeepSpeed's defaults: 1e9,
  and 5e6 on the CPU: more than these models' stages); ``z3-bounded``, the same and
  ``stage3_max_reuse_distance: 0`` (DeepSpeed's default 1e9 keeps every parameter that its
  trace sees used again gathered, the whole stage here: measured); ``z3-pp1`` and
  ``z3-pp1-bounded``, controls without the pipeline (pp=1, dp=4: one column, "stage 0", holding
  the whole model, partitioned 4 ways).

Models: ``tiny`` is configs/tiny_cpu.json's (4 layers, 128 wide, vocab 2048, seq 128);
``small`` a CPU-sized GPT-2 (8 layers, 256 wide, 8 heads, vocab 8192, seq 128). Both: fp32,
micro-batch 2, global batch 16 (4 micro-batches per pipeline per step), dropout 0, AdamW,
clipping 1.0; token ids from tests/toy_data.py's toy shards (the speed does not depend on them).

Per layout, each a fresh launch of 4 ranks forked from this process (DeepSpeed and the trainer
imported once, ``tests/helpers.py run_ranks``), ``pretrain`` for warmup + steps + 1 steps:

* step time: from ``on_step_start`` to ``after_step`` (the whole pipeline step, the optimizer
  and the gradient norm), the slowest rank of each step, median over the ``--steps`` steps
  after ``--warmup``; tokens/s = global batch x seq / that;
* bytes communicated per step: the last step, counted (``_pp_zero_count.CommCounter``: every
  ``c10d`` operator, by kind and process group; the counted step is not timed);
* bytes held per rank after a step (``_pp_zero_count.held_state``): parameters, ZeRO's fp32
  master partitions, Adam's state; the gradients attached when the inner optimizer steps; for
  ZeRO-3 the largest gathered working set seen at any collective of the counted step;
* CPU seconds per step (``time.process_time`` of each rank, its threads included, summed over
  the 4 ranks; median over the timed steps): what a step costs the machine, much less moved
  than the wall time when other jobs share the cores;
* peak RSS per rank (VmHWM, reset when the rank starts) and its rise over the RSS at start.

Target (issue 20): ZeRO-3 x PP within 1.5x the step time of ZeRO-1 x PP under DeepSpeed's
pipeline engine; its parameters + optimizer state per rank <= 1/dp of ZeRO-1's (plus the
gathered working set). The lines printed say whether they were met; the figures and the
machine go into BENCHMARKS.md ("Pipeline under ZeRO-3") unless --no-append or --quick.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import cpu_name  # bench/ is on sys.path when a bench script runs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SECTION = "## Pipeline under ZeRO-3 (issue 20, bench/pp_zero_bench.py)"
MB = 1e6
WORLD, PP = 4, 2

MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"n_layer": 4, "n_head": 4, "n_embd": 128, "n_ctx": 128, "vocab_size": 2048},
    "small": {"n_layer": 8, "n_head": 8, "n_embd": 256, "n_ctx": 128, "vocab_size": 8192},
}
SEQ, MICRO, GLOBAL = 128, 2, 16

Z3 = {"stage": 3, "stage3_param_persistence_threshold": 0}
LIVE1M = {**Z3, "stage3_max_live_parameters": 1_000_000, "stage3_prefetch_bucket_size": 500_000}
BOUNDED = {**LIVE1M, "stage3_max_reuse_distance": 0}
LAYOUTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "z1-ds": ({"pipeline_engine": "deepspeed"}, {"stage": 1}),
    "z1-stages": ({"pipeline_engine": "stages"}, {"stage": 1}),
    "z2": ({"pipeline_engine": "stages"}, {"stage": 2}),
    "z3": ({"pipeline_engine": "stages"}, Z3),
    "z3-default": ({"pipeline_engine": "stages"}, {"stage": 3}),
    "z3-gpipe": ({"pipeline_engine": "stages", "pipeline_schedule": "gpipe"}, Z3),
    "z3-live1m": ({"pipeline_engine": "stages"}, LIVE1M),
    "z3-bounded": ({"pipeline_engine": "stages"}, BOUNDED),
    # parallel.stage_recompute: one graph per stage (the first stage's working set)
    "z3-recompute": ({"pipeline_engine": "stages", "stage_recompute": True}, Z3),
    "z3-recompute-bounded": ({"pipeline_engine": "stages", "stage_recompute": True}, BOUNDED),
    # controls without the pipeline (pp=1, dp=4; the same model and global batch)
    "z3-pp1": ({"pp": 1, "pipeline_engine": "auto"}, Z3),
    "z3-pp1-bounded": ({"pp": 1, "pipeline_engine": "auto"}, BOUNDED),
}
"""name -> (``parallel`` keys, ``deepspeed.zero_optimization``)"""
DEFAULT_LAYOUTS = "z1-ds,z1-stages,z2,z3"


def config(run_dir: Path, data: str, model: str, layout: str, steps: int) -> Any:
    from tests import helpers

    par, zero = LAYOUTS[layout]
    return helpers.toy_config(
        run_dir, [data],
        model={**MODELS[model], "dropout": 0.0, "attn_dropout": 0.0},
        parallel={"tp": 1, "pp": PP, **par},
        optimizer={"lr": 1e-3, "weight_decay": 0.01, "grad_clip": 1.0},
        schedule={"warmup_steps": 2, "decay_steps": steps},
        data={"seq_len": SEQ, "split": "98,2,0"},
        training={"train_steps": steps, "micro_batch_size": MICRO, "global_batch_size": GLOBAL,
                  "eval_interval": 10**6, "eval_steps": 1, "deterministic": False},
        checkpoint={"save_interval": 10**6, "keep_last": 1},
        logging={"log_interval": 10**6, "tensorboard": False, "progress_bar": False},
        deepspeed={"zero_optimization": zero})


# --------------------------------------------------------------------------- one rank


def rank_main(rank: int, out: str, data: str, model: str, layout: str, warmup: int, steps: int) -> None:
    """Run ``pretrain`` in this layout and write this rank's measurements to OUT/rankR.json."""
    import torch
    from _pp_zero_count import CommCounter, held_grads, held_state
    from _rss import status_kb

    from gpt_dist.training import loop, metrics
    from gpt_dist.training.hooks import TrainHooks
    from gpt_dist.training.pretrain import pretrain
    from tests import helpers

    metrics.plot_loss = lambda run_dir: None  # matplotlib is not what is measured
    loop.save_checkpoint = lambda *a, **k: None  # nor the final checkpoint's write
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
    res: dict[str, Any] = {"rank": rank, "rss_start": status_kb("VmRSS") * 1024, "grads_at_step": 0}
    total = warmup + steps + 1
    counted = total
    counter = CommCounter()
    state: dict[str, Any] = {"module": None}

    adam_step = torch.optim.AdamW.step

    def step_measured(self: Any, *a: Any, **k: Any) -> Any:  # the inner optimizer, gradients attached
        res["grads_at_step"] = max(res["grads_at_step"], held_grads(state["module"], self))
        return adam_step(self, *a, **k)

    torch.optim.AdamW.step = step_measured  # type: ignore[method-assign]

    class Measure(TrainHooks):
        def __init__(self) -> None:
            self.t0 = self.c0 = 0.0
            self.times: list[float] = []
            self.cpu: list[float] = []

        def on_step_start(self, step: int, ctx: Any, stop: Any) -> None:
            if step == counted:
                counter.__enter__()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def after_step(self, record: dict[str, Any], eng: Any, ctx: Any) -> None:
            dt, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
            step = record["step"]
            module = eng.ds.module
            if step == counted:
                counter.sample()
                counter.__exit__(None, None, None)
            else:
                self.times.append(dt)
                self.cpu.append(cpu)
            if state["module"] is None:
                state["module"] = module
                res["stage"], res["dp_rank"] = ctx.pp_rank, ctx.dp_rank
                res["engine"] = type(eng.ds).__name__
                res["params_numel"] = sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())
                if hasattr(next(module.parameters()), "ds_tensor"):
                    counter.watch(list(module.parameters()))
            if step == warmup + 1:
                res["held"] = held_state(module, eng.optimizer)
            res.setdefault("losses", []).append(float(record["loss"]))

    hooks = Measure()
    cfg = config(Path(out) / "run", data, model, layout, total)
    with helpers.world(rank, WORLD, pp=cfg.parallel.pp) as ctx:
        import torch.distributed as dist

        counter.name_groups({"world": dist.group.WORLD, "dp": ctx.dp_group, "pp": ctx.pp_group,
                             "embedding": ctx.embedding_group})
        pretrain(cfg, ctx, hooks=hooks)
    res["step_times"], res["cpu_times"] = hooks.times, hooks.cpu
    res["comm_bytes"], res["comm_calls"] = dict(counter.bytes), dict(counter.calls)
    res["gathered_max"], res["gathered_max_at"] = counter.max_gathered, counter.max_at
    res["rss_peak"] = status_kb("VmHWM") * 1024
    Path(out, f"rank{rank}.json").write_text(json.dumps(res, indent=1))


# --------------------------------------------------------------------------- the main process


def run_layout(work: Path, data: str, model: str, layout: str, warmup: int, steps: int) -> dict[str, Any]:
    """One launch of 4 ranks; the per-rank results and the summary of the layout."""
    import shutil

    from tests import helpers

    out = work / f"{model}_{layout}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    helpers.run_ranks(rank_main, WORLD, str(out), data, model, layout, warmup, steps, timeout=900)
    wall = time.perf_counter() - t0
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    per_step = [max(r["step_times"][i] for r in ranks) for i in range(len(ranks[0]["step_times"]))]
    timed = per_step[warmup:]
    step = statistics.median(timed)
    cpu = statistics.median(sum(r["cpu_times"][i] for r in ranks) for i in range(warmup, len(per_step)))
    return {"model": model, "layout": layout, "ranks": ranks, "wall": wall, "step": step,
            "step_min": min(timed), "step_max": max(timed), "tokens_s": GLOBAL * SEQ / step, "cpu": cpu,
            "first_steps": per_step[:warmup], "loss_last": ranks[0]["losses"][-1]}


def by_stage(ranks: list[dict[str, Any]], fn: Any) -> list[float]:
    """``fn(rank)`` per stage: the larger of the stage's data-parallel ranks."""
    return [max(fn(r) for r in ranks if r["stage"] == s) for s in sorted({r["stage"] for r in ranks})]


def held_split(ranks: list[dict[str, Any]]) -> str:
    """Stage 0's parameters / fp32 master / Adam state (its larger rank); a master partition
    that is the parameter partition itself (ZeRO-3 in fp32) is counted under params only."""
    r = max((r for r in ranks if r["stage"] == 0), key=state_bytes)
    return " / ".join(f"{r['held'].get(k, 0) / MB:,.2f}" for k in ("params", "master", "optimizer_state"))


def state_bytes(r: dict[str, Any]) -> int:
    h = r["held"]
    return h.get("params", 0) + h.get("master", 0) + h.get("optimizer_state", 0)


def fmt_stages(values: list[float], scale: float = MB, digits: int = 1) -> str:
    return " / ".join(f"{v / scale:,.{digits}f}" for v in values)


def comm_total(r: dict[str, Any]) -> int:
    return sum(r["comm_bytes"].values())


def report(results: list[dict[str, Any]], header: str) -> str:
    lines = [header, ""]
    for model in dict.fromkeys(x["model"] for x in results):
        rows = [x for x in results if x["model"] == model]
        m = MODELS[model]
        params = sum(r["params_numel"] for r in rows[0]["ranks"] if r["dp_rank"] == 0)
        lines += [(f"**{model}**: {m['n_layer']} layers, {m['n_embd']} wide, {m['n_head']} heads, vocab "
                  f"{m['vocab_size']}, seq {SEQ}; {params:,} parameters over both stages (the tied embedding "
                  f"counted on each); micro-batch {MICRO}, global batch {GLOBAL} ({GLOBAL // (MICRO * WORLD // PP)} "
                  f"micro-batches per pipeline), fp32. Per stage: stage 0 / stage 1 (the larger of its 2 "
                  "data-parallel ranks). MB = 10^6 bytes."), "",
                  ("| layout | engine | ms/step (median; min-max) | tokens/s | x z1-ds time | CPU s/step (4 ranks) | x z1-ds CPU | params + master + Adam "
                  "MB/rank | params / master / Adam MB (stage 0) | grads at step MB | ZeRO-3 gathered max MB | peak RSS MB (rise) "
                  "| comm MB/step/rank | loss at last step |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        base = next((x for x in rows if x["layout"] == "z1-ds"), rows[0])
        for x in rows:
            rk = x["ranks"]
            rise = by_stage(rk, lambda r: r["rss_peak"] - r["rss_start"])
            lines.append(
                f"| {x['layout']} | {rk[0]['engine']} | {x['step'] * 1e3:,.0f} ({x['step_min'] * 1e3:,.0f}-"
                f"{x['step_max'] * 1e3:,.0f}) | {x['tokens_s']:,.0f} | {x['step'] / base['step']:.2f} | "
                f"{x['cpu']:.2f} | {x['cpu'] / base['cpu']:.2f} | "
                f"{fmt_stages(by_stage(rk, state_bytes), digits=2)} | "
                f"{held_split(rk)} | "
                f"{fmt_stages(by_stage(rk, lambda r: r['grads_at_step']), digits=2)} | "
                f"{fmt_stages(by_stage(rk, lambda r: r['gathered_max']), digits=2) if rk[0]['gathered_max'] else '-'} | "
                f"{fmt_stages(by_stage(rk, lambda r: r['rss_peak']), digits=0)} "
                f"({fmt_stages(rise, digits=0)}) | {fmt_stages(by_stage(rk, comm_total), digits=2)} | "
                f"{x['loss_last']:.4f} |")
        lines += ["", ("Bytes communicated per step, counted, per rank: by kind and process group (dp: the "
                  "stage's data-parallel group; pp: the pipeline's; embedding: the first and last stage's; "
                  "\"a 2-rank group\": one DeepSpeed's pipeline engine made), MB (calls). The size of a call is its buffer: "
                  "the gathered tensor of an all-gather, the input of a reduce-scatter, the tensor of an "
                  "all-reduce, a broadcast, a send, a receive."), "",
                  "| layout | stage 0 (rank 0) | stage 1 (rank of dp rank 0) |", "|---|---|---|"]
        for x in rows:
            cells = []
            for s in sorted({r["stage"] for r in x["ranks"]}):
                r = next(r for r in x["ranks"] if r["stage"] == s and r["dp_rank"] == 0)
                kinds = sorted(r["comm_calls"], key=lambda k: -r["comm_bytes"].get(k, 0))
                cells.append("; ".join(f"{k} {r['comm_bytes'].get(k, 0) / MB:,.2f} ({r['comm_calls'][k]})"
                                       for k in kinds))
            lines.append(f"| {x['layout']} | " + " | ".join(cells) + " |")
        lines += ["", *verdict(rows), ""]
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, as measured in ``rows`` (one model)."""
    got = {x["layout"]: x for x in rows}
    out = []
    if "z1-ds" in got and "z3" in got:
        z1, z3 = got["z1-ds"], got["z3"]
        ratio = z3["step"] / z1["step"]
        out.append(f"- ZeRO-3 x PP step time / ZeRO-1 x PP (DeepSpeed's engine): **{ratio:.2f}x** (target <= 1.5x: "
                   f"{'met' if ratio <= 1.5 else 'not met'}); CPU seconds per step {z3['cpu'] / z1['cpu']:.2f}x")
        s1, s3 = by_stage(z1["ranks"], state_bytes), by_stage(z3["ranks"], state_bytes)
        gath = by_stage(z3["ranks"], lambda r: r["gathered_max"])
        full = [by_stage(z1["ranks"], lambda r: r["held"].get("params", 0))[s] * 4 for s in range(PP)]
        dp = WORLD // PP
        lit = all(s3[s] <= s1[s] / dp + gath[s] for s in range(PP))
        rep = all(s3[s] <= full[s] / dp * 1.001 for s in range(PP))
        out.append(f"- ZeRO-3's parameters + master + Adam per rank {fmt_stages(s3, digits=2)} MB vs ZeRO-1's "
                   f"{fmt_stages(s1, digits=2)} MB: ZeRO-1's / dp + ZeRO-3's gathered working set = "
                   f"{fmt_stages([s1[s] / dp + gath[s] for s in range(PP)], digits=2)} MB "
                   f"({'met' if lit else 'not met'} read literally: ZeRO-1 already partitions the optimizer state, "
                   f"so only the parameters can shrink); 1/dp of the whole unpartitioned state (parameters, fp32 "
                   f"master, 2 Adam moments: 4 x ZeRO-1's parameters) = {fmt_stages([f / dp for f in full], digits=2)}"
                   f" MB ({'met' if rep else 'not met'})")
    if "z1-ds" in got and "z1-stages" in got:
        ratio = got["z1-stages"]["step"] / got["z1-ds"]["step"]
        cpu = got["z1-stages"]["cpu"] / got["z1-ds"]["cpu"]
        out.append(f"- stages engine at ZeRO-1 / DeepSpeed's pipeline engine at ZeRO-1, step time: **{ratio:.2f}x** "
                   f"({'matches (within 5%)' if ratio <= 1.05 else 'slower'}); CPU seconds per step {cpu:.2f}x")
    return out


def machine(load_before: tuple[float, ...], load_after: tuple[float, ...]) -> str:
    import deepspeed
    import torch

    ram = "?"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            ram = f"{int(line.split()[1]) / 2**20:.0f} GiB"
    return (f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores, {ram}, torch {torch.__version__}, DeepSpeed "
            f"{deepspeed.__version__}, 4 ranks (gloo, 1 thread each); load average (1/5/15 min) "
            f"{'/'.join(f'{v:.1f}' for v in load_before)} before, {'/'.join(f'{v:.1f}' for v in load_after)} after")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,small", help="of " + ",".join(MODELS))
    ap.add_argument("--layouts", default=DEFAULT_LAYOUTS, help="of " + ",".join(LAYOUTS))
    ap.add_argument("--warmup", type=int, default=3, help="steps not timed at the start")
    ap.add_argument("--steps", type=int, default=8, help="timed steps (then one counted step)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over the layouts (the fastest kept)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, 1 + 2 steps, nothing appended")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.models, args.warmup, args.steps, args.no_append = "tiny", 1, 2, True

    from tests import helpers

    work = args.work or Path(tempfile.mkdtemp(prefix="pp_zero_bench-"))
    data = str(helpers.toy_shards(work / "data" / "toy", n_docs=4000, lengths=(100, 400), seed=0))
    print(f"work directory {work} (each layout's run directory and rank results; results.json at the end)", flush=True)
    helpers.preload_trainer()
    load_before = os.getloadavg()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results: list[dict[str, Any]] = []
    for model in args.models.split(","):
        best: dict[str, dict[str, Any]] = {}
        for _ in range(args.repeats):
            for layout in args.layouts.split(","):
                x = run_layout(work, data, model, layout, args.warmup, args.steps)
                print(f"{model} {layout}: {x['step'] * 1e3:,.0f} ms/step, {x['tokens_s']:,.0f} tokens/s "
                      f"(launch {x['wall']:.0f} s; load {os.getloadavg()[0]:.1f})", flush=True)
                if layout not in best or x["step"] < best[layout]["step"]:
                    best[layout] = x
        results += list(best.values())
    header = (f"### {stamp}\n\n- machine: {machine(load_before, os.getloadavg())}\n- {args.warmup} warm-up steps, "
              f"{args.steps} timed, 1 counted; {args.repeats} round(s) over the layouts, the fastest kept")
    text = report(results, header)
    print(text)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    if not args.no_append:
        bench_md = ROOT / "BENCHMARKS.md"
        body = bench_md.read_text()
        if SECTION not in body:
            body = body.rstrip("\n") + f"\n\n{SECTION}\n"
        bench_md.write_text(body.rstrip("\n") + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
