"""``launch/evaluate.py``: options, the evaluation of one model or of every checkpoint of a run,
and the outputs. Every rank runs this; rank 0 prints and writes.

Bad input is one line (``evaluate: error: FILE:LINE: reason``) and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gpt_dist.eval.model import EvalError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="evaluate.py", description="Zero-shot evaluation (GPT-2 style) on the "
                                 "project's parallel model, with lm-evaluation-harness's definitions.")
    ap.add_argument("--model", required=True, help="native/HF export, local HF GPT-2 directory, or run directory")
    ap.add_argument("--tasks", required=True, help="comma-separated task names or KIND:PATH (see docs/eval.md)")
    ap.add_argument("--data-dir", default=None, help="folder holding NAME.jsonl for named tasks")
    ap.add_argument("--out", default=None, help="results JSON (default: print only)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's own)")
    # the deepspeed launcher appends --local_rank=N (the rank itself comes from the environment)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (under torchrun/deepspeed)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size; data parallel = world/(tp*pp)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    ap.add_argument("--rolling-context", type=int, default=1,
                    help="rolling perplexity: context tokens kept per window (1 = lm-eval's scheme)")
    ap.add_argument("--no-reuse-context", action="store_true", help="score each choice with a full pass")
    ap.add_argument("--bootstrap-iters", type=int, default=100_000, help="perplexity stderr (lm-eval's default)")
    ap.add_argument("--all-checkpoints", action="store_true", help="every committed checkpoint of a run directory")
    ap.add_argument("--sweep-dir", default=None, help="--all-checkpoints: TensorBoard + PNG folder "
                    "(default: RUN/eval_sweep)")
    ap.add_argument("--overlap-with", action="append", default=None,
                    help="training shard prefix (repeatable): report 8-gram overlap and clean-subset metrics")
    ap.add_argument("--overlap-n", type=int, default=8,
                    help="n-gram length in tokens (GPT-2: 8; more for small vocabularies, see docs/eval.md)")
    ap.add_argument("--overlap-threshold", type=float, default=0.0,
                    help="an example overlaps when more than this share of its n-grams is found (0: any)")
    ap.add_argument("--overlap-cache", default=None, help="folder for the cached Bloom filter")
    ap.add_argument("--overlap-fp-rate", type=float, default=1e-4, help="Bloom filter false-positive rate")
    ap.add_argument("--harness", choices=["builtin", "lm-eval"], default="builtin")
    ap.add_argument("--include-path", default=None, help="--harness lm-eval: folder of task YAMLs")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--per-example", action="store_true", help="keep per-example results in --out")
    return ap


def _settings(args: argparse.Namespace, ctx: Any, max_length: int) -> dict[str, Any]:
    return {"batch_size": args.batch_size, "max_length": max_length, "tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp,
            "dtype": args.dtype, "rolling_context": args.rolling_context, "bootstrap_iters": args.bootstrap_iters,
            "reuse_context": not args.no_reuse_context}


def evaluate_model(em: Any, tasks: list[Any], args: argparse.Namespace,
                   overlap: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score every task on ``em``; the results dict (``results.py``), the same on every rank."""
    from gpt_dist.eval import tasks as T
    from gpt_dist.eval.results import FORMAT
    from gpt_dist.eval.scoring import Scorer

    t0 = time.perf_counter()
    scorer = Scorer(em, args.batch_size, reuse_context=not args.no_reuse_context,
                    progress=not args.no_progress)
    out: dict[str, Any] = {}
    for task in tasks:
        try:
            raw = T.score(task, scorer, em.tokenizer, args.rolling_context)
        except ValueError as exc:
            if isinstance(exc, EvalError):
                raise
            raise EvalError(f"{task.path}: {exc}") from None
        entry: dict[str, Any] = {"kind": task.kind, "file": str(task.path), "data_sha256": task.sha256,
                                 "n": len(task.docs),
                                 "metrics": T.compute_metrics(task, raw, None, args.bootstrap_iters)}
        if overlap is not None and task.name in overlap:
            o = overlap[task.name]
            entry["overlap"] = o["summary"]
            entry["metrics_clean"] = T.compute_metrics(task, raw, o["clean"], args.bootstrap_iters)
        entry["per_example"] = raw
        out[task.name] = entry
    model = {**em.source, "fingerprint": em.fingerprint, "config": asdict(em.cfg)}
    return {"format": FORMAT, "version": 1, "model": model, "settings": _settings(args, em.ctx, em.max_length),
            "tasks": out, "timing": {"seconds": round(time.perf_counter() - t0, 3), **scorer.stats}}


def _strip(res: dict[str, Any], keep_examples: bool) -> dict[str, Any]:
    if keep_examples:
        return res
    return {**res, "tasks": {k: {kk: vv for kk, vv in v.items() if kk != "per_example"}
                             for k, v in res["tasks"].items()}}


def _overlap(args: argparse.Namespace, tasks: list[Any], tok: Any, ctx: Any) -> dict[str, Any] | None:
    if not args.overlap_with:
        return None
    from gpt_dist.eval.overlap import task_overlap

    result = None
    if ctx.rank == 0:   # one rank builds (or loads) the filter; the masks go to every rank
        result = task_overlap(args.overlap_with, tasks, tok, n=args.overlap_n, cache_dir=args.overlap_cache,
                              fp_rate=args.overlap_fp_rate, threshold=args.overlap_threshold,
                              progress=not args.no_progress)
    return ctx.broadcast_object(result)


def _checkpoint_dirs(run: Path) -> list[Path]:
    from gpt_dist import checkpoint_format as ckpt

    root = ckpt.ckpt_root(run)
    tags = ckpt.committed_tags(root)
    if not tags:
        raise EvalError(f"--all-checkpoints: {root}: no committed checkpoint (is {run} a run directory?)")
    return [root / t for t in tags]


def run(args: argparse.Namespace) -> int:
    from gpt_dist.eval import tasks as T
    from gpt_dist.eval.model import load_eval_model
    from gpt_dist.eval.results import FORMAT, markdown_table, sweep_outputs, write_json
    from gpt_dist.inference import open_context

    if args.batch_size < 1:
        raise EvalError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.harness == "lm-eval":
        from gpt_dist.eval.harness import run_harness

        return run_harness(args)
    tasks = [T.read(t, args.limit) for t in T.resolve(args.tasks, args.data_dir)]
    with open_context(args.tp, args.pp, args.device) as ctx:
        models = _checkpoint_dirs(Path(args.model)) if args.all_checkpoints else [Path(args.model)]
        sweep, overlap = [], None
        for i, path in enumerate(models):
            em = load_eval_model(path, ctx, args.tokenizer, args.dtype)
            if i == 0:
                overlap = _overlap(args, tasks, em.tokenizer, ctx)
            res = evaluate_model(em, tasks, args, overlap)
            sweep.append(res)
            if ctx.rank == 0:
                step = res["model"].get("step")
                print(f"\n{res['model']['path']}" + (f" (step {step})" if step is not None else ""))
                print(markdown_table(res), flush=True)
            del em
        if ctx.rank == 0:
            if args.all_checkpoints:
                paths = sweep_outputs(sweep, Path(args.sweep_dir) if args.sweep_dir else Path(args.model) / "eval_sweep")
                print(f"sweep: TensorBoard {paths['tensorboard']}, plot {paths['plot']}")
                if args.out:
                    write_json(Path(args.out), {"format": FORMAT, "version": 1, "outputs": paths,
                                                "sweep": [_strip(r, False) for r in sweep]})
            elif args.out:
                write_json(Path(args.out), _strip(sweep[0], args.per_example))
            if args.out:
                print(f"results: {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except EvalError as exc:
        print(f"evaluate: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
