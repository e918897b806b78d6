#!/usr/bin/env python
"""The staged preprocessing job (issue 21) vs the single-node command on the same corpus.

    python bench/staged_bench.py [--corpus FILE.jsonl | --max-mb 11] [--tasks 2] [--repeats 2]
        [--work DIR] [--no-append]

1. The corpus (``--corpus``, or data_tools/sample_corpus.py's sample of ``--max-mb`` MB) and
   a sentencepiece BPE tokenizer trained on it (``--vocab-size``); neither is timed.
2. **single-node**: ``data_tools/preprocess.py --workers TASKS``, a fresh process, start-up
   to exit.
3. **staged**: every task of every stage as its own fresh process, ``--workers 1`` each,
   the tasks of a per-task stage started together (as a job array's elements run on
   ``TASKS`` one-CPU allocations), the stages one after another (as afterok chains them).
   No Slurm: its scheduling latency (seconds per stage on a real cluster) is not counted.
   Reported: the total wall time, each stage's, the CPU seconds, each task's peak RSS.
4. The bytes the stages write for each other (``keys/``, ``bands/``, ``components/`` of
   the work directory: not the shards, which are the output) per input MB, and the memory
   of a keys task: its peak RSS minus the plan task's (the same imports and tokenizer),
   per candidate document and per key (the exact key and each MinHash band).

Both outputs are compared document by document (they must be equal). Best of --repeats.
Figures and the machine are added to BENCHMARKS.md unless --no-append.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from _machine import cpu_name  # bench/ is on sys.path when a bench script runs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SECTION = "## Staged preprocessing (bench/staged_bench.py)"
CLI = str(ROOT / "data_tools" / "preprocess.py")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_together(cmds: list[list[str]]) -> tuple[float, float, list[int]]:
    """Start ``cmds`` at once; (wall seconds, CPU seconds, peak RSS KiB of each)."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for cmd in cmds]
    cpu, rss = 0.0, {}
    pending = {p.pid: p for p in procs}
    while pending:
        pid, status, usage = os.wait4(-1, 0)
        if pid not in pending:
            continue
        p = pending.pop(pid)
        p.returncode = os.waitstatus_to_exitcode(status)
        cpu += usage.ru_utime + usage.ru_stime
        rss[pid] = usage.ru_maxrss
        if p.returncode != 0:
            err = p.stderr.read().decode(errors="replace").strip().splitlines()[-2:] if p.stderr else []
            raise RuntimeError(f"{' '.join(p.args[2:6])} exited {p.returncode}: {' | '.join(err)}")
    return time.perf_counter() - t0, cpu, [rss[p.pid] for p in procs]


def staged(corpus: Path, tok: Path, prefix: str, work: Path, tasks: int) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    base = [sys.executable, CLI, "--work-dir", str(work)]
    out: dict = {"stages": {}, "rss_kib": {}, "cpu": 0.0}
    plan = base + ["--stage", "plan", "--tasks", str(tasks), "--input", str(corpus), "--tokenizer", str(tok),
                   "--output-prefix", prefix, "--workers", "1", "--no-progress", "--overwrite"]
    t0 = time.perf_counter()
    for stage, cmds in (("plan", [plan]),
                        ("keys", [base + ["--stage", "keys", "--task-id", str(t)] for t in range(tasks)]),
                        ("bands", [base + ["--stage", "bands", "--task-id", str(t)] for t in range(tasks)]),
                        ("components", [base + ["--stage", "components"]]),
                        ("tokenize", [base + ["--stage", "tokenize", "--task-id", str(t)] for t in range(tasks)]),
                        ("finalize", [base + ["--stage", "finalize"]])):
        wall, cpu, rss = run_together(cmds)
        out["stages"][stage] = wall
        out["rss_kib"][stage] = rss
        out["cpu"] += cpu
    out["wall"] = time.perf_counter() - t0
    between = sum(p.stat().st_size for d in ("keys", "bands", "components") for p in (work / d).iterdir())
    out["between_bytes"] = between
    keys = [json.loads((work / "keys" / f"{t:05d}.done").read_text()) for t in range(tasks)]
    plan_json = json.loads((work / "plan.json").read_text())
    out["keys_per_doc"] = plan_json["bands"] + 1
    out["candidates"] = [k["counts"].get("candidates", 0) for k in keys]
    return out


def single(corpus: Path, tok: Path, prefix: str, workers: int) -> tuple[float, float]:
    wall, cpu, _ = run_together([[sys.executable, CLI, "--input", str(corpus), "--tokenizer", str(tok),
                                  "--output-prefix", prefix, "--workers", str(workers), "--no-progress",
                                  "--overwrite"]])
    return wall, cpu


def memory_probe(work: Path, tok: Path, docs: int) -> dict:
    """Peak RSS of a keys and a bands task (1 task) over ``docs`` short distinct documents,
    against the plan task's (same imports, same tokenizer): the per-document cost of keys."""
    import random

    corpus = work / f"probe_{docs}.jsonl"
    if not corpus.exists():
        rng = random.Random(0)
        vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(50_000)]
        with open(corpus, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": " ".join(rng.choices(vocab, k=60)) + "."}) + "\n" for _ in range(docs))
    w = work / f"probe_work_{docs}"
    shutil.rmtree(w, ignore_errors=True)
    base = [sys.executable, CLI, "--work-dir", str(w)]
    rss = {}
    for stage, extra in (("plan", ["--tasks", "1", "--input", str(corpus), "--tokenizer", str(tok), "--output-prefix",
                                   str(work / "probe_out"), "--workers", "1", "--no-progress", "--min-chars", "10"]),
                         ("keys", ["--task-id", "0"]), ("bands", ["--task-id", "0"])):
        rss[stage] = run_together([base + ["--stage", stage, *extra]])[2][0]
    keys = json.loads((w / "plan.json").read_text())["bands"] + 1
    cand = json.loads((w / "keys" / "00000.done").read_text())["counts"]["candidates"]
    return {"docs": cand, "keys": keys, "rss": rss,
            "keys_b": (rss["keys"] - rss["plan"]) * 1024 / (cand * keys),
            "bands_b": (rss["bands"] - rss["plan"]) * 1024 / (cand * keys)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", help="JSONL corpus (default: generate the sample corpus)")
    ap.add_argument("--max-mb", type=float, default=11.0)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", help="work directory (default: a temporary one, removed after)")
    ap.add_argument("--memory-docs", type=int, default=200_000, help="documents of the memory probe (0: none)")
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)  # corpus + tokenizer, then exit
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="staged_bench."))
    work.mkdir(parents=True, exist_ok=True)
    corpus = Path(args.corpus) if args.corpus else work / "corpus.jsonl"
    tok = work / "tokenizer"
    if args.prepare:
        from gpt_dist.data.sample_corpus import write_sample_corpus
        from gpt_dist.tokenizer import train_tokenizer

        if not corpus.exists():
            write_sample_corpus(corpus, int(args.max_mb * 1e6))
        if not (tok / "gpt_dist_tokenizer.json").exists():
            train_tokenizer([corpus], args.vocab_size, tok)
        return 0
    try:
        # in a child: this process stays small, so its children's peak RSS is their own
        # (a forked child starts with its parent's resident pages counted)
        subprocess.run([sys.executable, __file__, "--prepare", "--work", str(work), "--max-mb", str(args.max_mb),
                        "--vocab-size", str(args.vocab_size), *(["--corpus", args.corpus] if args.corpus else [])],
                       check=True, env=_env())
        probe = memory_probe(work, tok, args.memory_docs) if args.memory_docs else None
        mb = corpus.stat().st_size / 1e6
        singles, stageds = [], []
        for k in range(args.repeats):
            singles.append(single(corpus, tok, str(work / "single" / "out"), args.tasks))
            stageds.append(staged(corpus, tok, str(work / "staged" / "out"), work / "staged_work", args.tasks))
            print(f"run {k + 1}: single {singles[-1][0]:.2f} s, staged {stageds[-1]['wall']:.2f} s", flush=True)
        from tests.data_tools.dt_common import read_docs

        a = [d.tolist() for d in read_docs(str(work / "single" / "out"))]
        b = [d.tolist() for d in read_docs(str(work / "staged" / "out"))]
        if a != b:
            raise RuntimeError("the staged output differs from the single-node output")
        s_best = min(singles)
        g = min(stageds, key=lambda r: r["wall"])
        stages = ", ".join(f"{k} {v:.2f}" for k, v in g["stages"].items())
        rss = ", ".join(f"{k} {max(v) / 1024:.0f}" for k, v in g["rss_kib"].items())
        staged_runs = ", ".join(f"{r['wall']:.2f}" for r in stageds)
        lines = [
            (f"machine: {cpu_name()}, {os.cpu_count()} cores; load {os.getloadavg()[0]:.1f}; corpus {mb:.1f} MB "
            f"({corpus.name}), {len(a)} documents kept, identical in both"),
            (f"single-node `preprocess.py --workers {args.tasks}`: {s_best[0]:.2f} s wall, {s_best[1]:.2f} s CPU "
            f"(runs: {', '.join(f'{w:.2f}' for w, _ in singles)})"),
            (f"staged, {args.tasks} tasks of 1 worker each, every task a fresh process: {g['wall']:.2f} s wall "
            f"(runs: {staged_runs}), {g['cpu']:.2f} s CPU; "
            f"overhead {g['wall'] / s_best[0]:.2f}x wall, {g['cpu'] / max(s_best[1], 1e-9):.2f}x CPU"),
            f"per stage (s): {stages}",
            f"peak RSS per task (MiB, the largest task of each stage): {rss}",
            (f"written between stages (keys/, bands/, components/): {g['between_bytes'] / 1e6:.2f} MB = "
            f"{g['between_bytes'] / 1e6 / mb:.3f} MB per input MB"),
        ]
        if probe is not None:
            r = probe["rss"]
            lines.append(f"memory probe, {probe['docs']:,} short documents in 1 task: peak RSS plan {r['plan'] / 1024:.0f}, "
                         f"keys {r['keys'] / 1024:.0f}, bands {r['bands'] / 1024:.0f} MiB: keys task "
                         f"{probe['keys_b']:.0f}, bands task {probe['bands_b']:.0f} bytes per document per key "
                         f"({probe['keys']} keys: the exact key and {probe['keys'] - 1} bands)")
        print("\n".join(lines))
        if not args.no_append:
            path = ROOT / "BENCHMARKS.md"
            text = path.read_text(encoding="utf-8")
            entry = f"\n### {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n" + "".join(f"- {x}\n" for x in lines)
            if SECTION not in text:
                text = text.rstrip("\n") + f"\n\n{SECTION}\n\nRun by `python bench/staged_bench.py` (see its " \
                       "docstring for what is timed).\n"
            path.write_text(text.rstrip("\n") + "\n" + entry, encoding="utf-8")
            print(f"added to {path}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
