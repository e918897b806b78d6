"""``launch/evaluate.py``: options, the evaluation of one model or of every checkpoint of a run,
and the outputs. Every rank runs this; rank 0 prints and writes.

The options are the config's ``eval`` section (``gpt_dist/config/evaluation.py``), from
``--config FILE``, the short flags (aliases of its keys) and ``--set eval.KEY=VALUE``, in that
order. Bad input is one line (``evaluate: config error: eval.KEY: reason``, ``evaluate: error:
FILE:LINE: reason``) and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gpt_dist import checkpoint_format as ckpt
from gpt_dist.config import ConfigError, EvalConfig, load_config, parse_value
from gpt_dist.eval import tasks as T
from gpt_dist.eval.harness import run_harness
from gpt_dist.eval.model import EvalError, load_eval_model
from gpt_dist.eval.overlap import task_overlap
from gpt_dist.eval.results import FORMAT, markdown_table, sweep_outputs, write_json
from gpt_dist.eval.scoring import Scorer
from gpt_dist.inference import open_context

#: The short flags: each is an alias of ``--set eval.KEY=VALUE`` (README and docs/eval.md use them).
#: (flag, eval key, help); the values are checked by the config loader, one line naming the key.
_VALUE_FLAGS = (
    ("--model", "model", "native/HF export, local HF GPT-2 directory, or run directory"),
    ("--tasks", "tasks", "comma-separated task names or KIND:PATH (see docs/eval.md)"),
    ("--data-dir", "data_dir", "folder holding NAME.jsonl for named tasks"),
    ("--out", "out", "results JSON (default: print only)"),
    ("--tokenizer", "tokenizer", "tokenizer directory (default: the model's own)"),
    ("--tp", "tp", "tensor-parallel size (under torchrun/deepspeed)"),
    ("--pp", "pp", "pipeline-parallel size; data parallel = world/(tp*pp)"),
    ("--batch-size", "batch_size", "sequences per forward pass (default 8)"),
    ("--device", "device", "auto, cpu or cuda"),
    ("--dtype", "dtype", "fp32, bf16 or fp16"),
    ("--limit", "limit", "first N examples of each task"),
    ("--rolling-context", "rolling_context",
     "rolling perplexity: context tokens kept per window (1 = lm-eval's scheme)"),
    ("--bootstrap-iters", "bootstrap_iters", "perplexity stderr (lm-eval's default: 100000)"),
    ("--sweep-dir", "sweep_dir", "--all-checkpoints: TensorBoard + PNG folder (default: RUN/eval_sweep)"),
    ("--overlap-n", "overlap_n", "n-gram length in tokens (GPT-2: 8; more for small vocabularies, see docs/eval.md)"),
    ("--overlap-threshold", "overlap_threshold",
     "an example overlaps when more than this share of its n-grams is found (0: any)"),
    ("--overlap-cache", "overlap_cache", "folder for the cached Bloom filter"),
    ("--overlap-fp-rate", "overlap_fp_rate", "Bloom filter false-positive rate"),
    ("--harness", "harness", "builtin or lm-eval"),
    ("--include-path", "include_path", "--harness lm-eval: folder of task YAMLs"),
)
#: (flag, eval key, the value it sets, help)
_SWITCHES = (
    ("--no-reuse-context", "reuse_context", False, "score each choice with a full pass"),
    ("--all-checkpoints", "all_checkpoints", True, "every committed checkpoint of a run directory"),
    ("--no-progress", "progress", False, "no progress bars"),
    ("--per-example", "per_example", True, "keep per-example results in --out"),
)
#: Keys whose flag value is a number (parsed as --set parses it); the others are strings as given.
_NUMERIC = {k for k, tp in typing.get_type_hints(EvalConfig).items()
            if {int, float} & set(typing.get_args(tp) or (tp,))}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="evaluate.py", description="Zero-shot evaluation (GPT-2 style) on the project's parallel model, "
        "with lm-evaluation-harness's definitions. Every option is a key of the config's eval section "
        "(gpt_dist/config/evaluation.py): give it in --config FILE, as --set eval.KEY=VALUE, or by its flag.")
    ap.add_argument("--config", default=None, help="config JSON holding an eval section (and optionally others)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], nargs="+",
                    metavar="SECTION.KEY=VALUE", help="override config values (after the flags below)")
    for flag, key, help_text in _VALUE_FLAGS:
        ap.add_argument(flag, dest=key, default=argparse.SUPPRESS, help=f"eval.{key}: {help_text}")
    for flag, key, value, help_text in _SWITCHES:
        ap.add_argument(flag, dest=key, action="store_const", const=value, default=argparse.SUPPRESS,
                        help=f"eval.{key}={str(value).lower()}: {help_text}")
    ap.add_argument("--overlap-with", dest="overlap_with", action="append", default=argparse.SUPPRESS,
                    help="eval.overlap_with: training shard prefix (repeatable): report 8-gram overlap and "
                    "clean-subset metrics")
    # the deepspeed launcher appends --local_rank=N (the rank itself comes from the environment)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    """The eval section from ``--config``, the short flags, then ``--set``; a bad value raises
    ``ConfigError`` naming its ``eval.KEY``."""
    args = vars(build_parser().parse_args(argv))
    path, overrides = args.pop("config"), [item for group in args.pop("overrides") for item in group]
    args.pop("local_rank")
    values = {k: parse_value(v) if k in _NUMERIC else v for k, v in args.items()}
    cfg = load_config(path, overrides, values={"eval": values})
    assert cfg.eval is not None  # load_config created the section
    return cfg.eval


def _settings(ev: EvalConfig, ctx: Any, max_length: int) -> dict[str, Any]:
    return {"batch_size": ev.batch_size, "max_length": max_length, "tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp,
            "dtype": ev.dtype, "rolling_context": ev.rolling_context, "bootstrap_iters": ev.bootstrap_iters,
            "reuse_context": ev.reuse_context}


def evaluate_model(em: Any, tasks: list[Any], ev: EvalConfig,
                   overlap: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score every task on ``em``; the results dict (``results.py``), the same on every rank."""
    t0 = time.perf_counter()
    scorer = Scorer(em, ev.batch_size, reuse_context=ev.reuse_context, progress=ev.progress)
    out: dict[str, Any] = {}
    for task in tasks:
        try:
            raw = T.score(task, scorer, em.tokenizer, ev.rolling_context)
        except ValueError as exc:
            if isinstance(exc, EvalError):
                raise
            raise EvalError(f"{task.path}: {exc}") from None
        entry: dict[str, Any] = {"kind": task.kind, "file": str(task.path), "data_sha256": task.sha256,
                                 "n": len(task.docs),
                                 "metrics": T.compute_metrics(task, raw, None, ev.bootstrap_iters)}
        if overlap is not None and task.name in overlap:
            o = overlap[task.name]
            entry["overlap"] = o["summary"]
            entry["metrics_clean"] = T.compute_metrics(task, raw, o["clean"], ev.bootstrap_iters)
        entry["per_example"] = raw
        out[task.name] = entry
    model = {**em.source, "fingerprint": em.fingerprint, "config": asdict(em.cfg)}
    return {"format": FORMAT, "version": 1, "model": model, "settings": _settings(ev, em.ctx, em.max_length),
            "tasks": out, "timing": {"seconds": round(time.perf_counter() - t0, 3), **scorer.stats}}


def _strip(res: dict[str, Any], keep_examples: bool) -> dict[str, Any]:
    if keep_examples:
        return res
    return {**res, "tasks": {k: {kk: vv for kk, vv in v.items() if kk != "per_example"}
                             for k, v in res["tasks"].items()}}


def _overlap(ev: EvalConfig, tasks: list[Any], tok: Any, ctx: Any) -> dict[str, Any] | None:
    if not ev.overlap_with:
        return None

    result = None
    if ctx.rank == 0:   # one rank builds (or loads) the filter; the masks go to every rank
        result = task_overlap(ev.overlap_with, tasks, tok, n=ev.overlap_n, cache_dir=ev.overlap_cache,
                              fp_rate=ev.overlap_fp_rate, threshold=ev.overlap_threshold, progress=ev.progress)
    return ctx.broadcast_object(result)


def _checkpoint_dirs(run: Path) -> list[Path]:
    root = ckpt.ckpt_root(run)
    tags = ckpt.committed_tags(root)
    if not tags:
        raise EvalError(f"--all-checkpoints: {root}: no committed checkpoint (is {run} a run directory?)")
    return [root / t for t in tags]


def run(ev: EvalConfig) -> int:
    if ev.harness == "lm-eval":
        return run_harness(ev)
    tasks = [T.read(t, ev.limit) for t in T.resolve(ev.tasks, ev.data_dir)]
    with open_context(ev.tp, ev.pp, ev.device) as ctx:
        models = _checkpoint_dirs(Path(ev.model)) if ev.all_checkpoints else [Path(ev.model)]
        sweep, overlap = [], None
        for i, path in enumerate(models):
            em = load_eval_model(path, ctx, ev.tokenizer, ev.dtype)
            if i == 0:
                overlap = _overlap(ev, tasks, em.tokenizer, ctx)
            res = evaluate_model(em, tasks, ev, overlap)
            sweep.append(res)
            if ctx.rank == 0:
                step = res["model"].get("step")
                print(f"\n{res['model']['path']}" + (f" (step {step})" if step is not None else ""))
                print(markdown_table(res), flush=True)
            del em
        if ctx.rank == 0:
            if ev.all_checkpoints:
                paths = sweep_outputs(sweep, Path(ev.sweep_dir) if ev.sweep_dir else Path(ev.model) / "eval_sweep")
                print(f"sweep: TensorBoard {paths['tensorboard']}, plot {paths['plot']}")
                if ev.out:
                    write_json(Path(ev.out), {"format": FORMAT, "version": 1, "outputs": paths,
                                                "sweep": [_strip(r, False) for r in sweep]})
            elif ev.out:
                write_json(Path(ev.out), _strip(sweep[0], ev.per_example))
            if ev.out:
                print(f"results: {ev.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        ev = parse_args(argv)
    except ConfigError as exc:
        print(f"evaluate: config error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    try:
        return run(ev)
    except EvalError as exc:
        print(f"evaluate: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
