#!/usr/bin/env python
"""This checkout's gpt_dist against another commit's, side by side, on the same machine in one run.

    python bench/versus_commit.py --base e76006b [--rounds 2] [--benches train,finetune,eval]

For a restructuring that must not slow anything down: each bench (``train_bench.py``,
``finetune_bench.py``, ``eval_bench.py``) runs at the base commit (a ``git archive`` of it in
a temporary directory, first on ``PYTHONPATH`` so its own ``gpt_dist`` is imported) and here,
alternately, ``--rounds`` times each (base, here, base, here, ...: a machine whose speed
drifts favours neither), every run a fresh process with ``--repeats 1 --no-append``. Only
gpt_dist's own figures are compared (the Hugging Face / lm-eval contenders measure the
reference, not the change): the best of the rounds on each side, and here/base.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: bench -> (script, the table rows to compare: row label -> column index of the time, lower is better)
BENCHES: dict[str, tuple[str, dict[str, int]]] = {
    "train": ("bench/train_bench.py", {"gpt_dist + DeepSpeed": 1, "gpt_dist plain loop": 1}),
    "finetune": ("bench/finetune_bench.py", {"gpt_dist fine-tuning (DeepSpeed)": 1}),
    "eval": ("bench/eval_bench.py", {"lambada": 4, "ptb": 4, "hellaswag": 4, "all": 4}),
}
UNITS = {"train": "ms/step", "finetune": "ms/step", "eval": "gpt_dist s"}


def checkout(rev: str, into: Path) -> Path:
    """The tree of ``rev`` (tracked files) unpacked under ``into``."""
    tar = into / "base.tar"
    with open(tar, "wb") as fh:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev], stdout=fh, check=True)
    with tarfile.open(tar) as tf:
        tf.extractall(into / "tree", filter="data")
    return into / "tree"


def run_bench(tree: Path, script: str, rows: dict[str, int]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, str(tree / script), "--repeats", "1", "--no-append"],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{tree / script}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    out: dict[str, float] = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in rows:
            out[cells[0]] = float(re.sub(r"[^0-9.]", "", cells[rows[cells[0]]]))
    missing = set(rows) - set(out)
    if missing:
        raise SystemExit(f"{tree / script}: no row {sorted(missing)} in its output:\n{proc.stdout[-2000:]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the commit to compare with (e.g. the one before a change)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--benches", default="train,finetune,eval")
    args = ap.parse_args()
    names = [b.strip() for b in args.benches.split(",") if b.strip()]
    unknown = [b for b in names if b not in BENCHES]
    if unknown:
        raise SystemExit(f"--benches: unknown {unknown[0]!r} (one of {', '.join(BENCHES)})")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="versus_") as tmp:
        base = checkout(args.base, Path(tmp))
        title = (f"`bench/versus_commit.py --base {args.base} --rounds {args.rounds}` "
                 f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): base {args.base} vs here {head} "
                 "(uncommitted changes included), alternating, best of the rounds")
        lines = [title, "",
                 "| bench | row | unit | base | here | here / base |", "|---|---|---|---|---|---|"]
        for name in names:
            script, rows = BENCHES[name]
            best: dict[str, dict[str, float]] = {"base": {}, "here": {}}
            for r in range(args.rounds):
                for side, tree in (("base", base), ("here", ROOT)):
                    got = run_bench(tree, script, rows)
                    print(f"{name} round {r + 1} {side}: {got}", flush=True)
                    for k, v in got.items():
                        best[side][k] = min(best[side].get(k, float("inf")), v)
            for row in rows:
                b, h = best["base"][row], best["here"][row]
                lines.append(f"| {name} | {row} | {UNITS[name]} | {b:.2f} | {h:.2f} | {h / b:.3f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
