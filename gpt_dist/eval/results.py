"""Results of an evaluation: the JSON file, the Markdown table, and a checkpoint sweep's
TensorBoard scalars and PNG plot.

``results.json``::

    {"format": "gpt_dist-eval", "version": 1,
     "model": {"path", "kind", "step", "fingerprint", "tokenizer_fingerprint", "config"},
     "settings": {"batch_size", "max_length", "tp", "pp", "dp", "dtype", "rolling_context",
                  "bootstrap_iters", "reuse_context"},
     "tasks": {NAME: {"kind", "file", "data_sha256", "n",
                      "metrics": {METRIC: {"value", "stderr"}},      stderr as lm-eval (None: n/a)
                      "overlap": {...}, "metrics_clean": {...}}},      with --overlap-with
     "timing": {"seconds", "requests", "forward_tokens", "context_passes_saved"}}

A sweep (``--all-checkpoints``) writes ``{"format": ..., "sweep": [results, ...]}``: one
entry per committed checkpoint, in step order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpt_dist.utils import atomic_write_text

FORMAT = "gpt_dist-eval"
LOWER_IS_BETTER = ("perplexity", "bits_per_byte")


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"


def markdown_table(res: dict[str, Any]) -> str:
    """| task | metric | value | stderr | n | (clean value | overlap) |"""
    overlap = any("overlap" in t for t in res["tasks"].values())
    head = "| task | metric | value | ± stderr | n |" + (" clean value | n clean | overlap |" if overlap else "")
    rule = "|---|---|---|---|---|" + ("---|---|---|" if overlap else "")
    rows = [head, rule]
    for name, t in res["tasks"].items():
        for m, v in t["metrics"].items():
            row = f"| {name} | {m} | {_fmt(v['value'])} | {_fmt(v['stderr'])} | {t['n']} |"
            if overlap:
                o = t.get("overlap") or {}
                clean = (t.get("metrics_clean") or {}).get(m, {}).get("value")
                row += f" {_fmt(clean)} | {o.get('clean', 'n/a')} | {100 * o.get('share', 0):.1f}% |"
            rows.append(row)
    return "\n".join(rows)


def write_json(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def sweep_outputs(sweep: list[dict[str, Any]], out_dir: Path) -> dict[str, str]:
    """Metrics against step: TensorBoard scalars ``eval/TASK/METRIC`` in ``out_dir/tb`` and
    one PNG panel per (task, metric) in ``out_dir/eval_sweep.png``. Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series: dict[str, list[tuple[int, float]]] = {}
    for r in sweep:
        step = int(r["model"].get("step") or 0)
        for task, t in r["tasks"].items():
            for m, v in t["metrics"].items():
                series.setdefault(f"{task}/{m}", []).append((step, float(v["value"])))
    from torch.utils.tensorboard import SummaryWriter

    tb = out_dir / "tb"
    writer = SummaryWriter(log_dir=str(tb))
    for key, pts in series.items():
        for step, value in pts:
            writer.add_scalar(f"eval/{key}", value, step)
    writer.close()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(series)
    cols = min(3, n) or 1
    rows = -(-n // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (key, pts) in zip(axes.flat, sorted(series.items()), strict=False):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_title(key + (" (lower is better)" if key.endswith(LOWER_IS_BETTER) else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    png = out_dir / "eval_sweep.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return {"tensorboard": str(tb), "plot": str(png)}
