"""Throughput accounting (FLOPs, MFU) and the run's logs: console, JSONL, TensorBoard, PNG.

FLOPs per token (Megatron, Narayanan et al. 2021, the convention MFU is reported in here):

    F_token = 72 l h^2 + 12 l h s + 6 h V            (no recompute; non-causal attention)

the dense GEMMs, the attention score/value GEMMs counted as full (non-causal) attention, and
the logits. Full activation recompute adds one forward (HFU): 96 l h^2 + 16 l h s + 6 h V... we
report MFU only, which ignores recompute by definition. MFU = F_token * tokens/s / (n_dev * peak).
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt_dist.config import Config, LoggingConfig, ModelConfig, ParallelConfig, TrainingConfig

#: dense bf16 peak TFLOP/s by device-name substring (PAPERS_AND_NUMBERS.md)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0}


def flops_per_token(m: ModelConfig, par: ParallelConfig, seq_len: int) -> float:
    """F_token above for sequences of ``seq_len`` tokens (``Config.sequence_length``); the
    vocabulary is the one padded for ``par.tp``."""
    l, h, s, v = m.n_layer, m.n_embd, seq_len, m.padded_vocab_size(par.tp)
    return 72 * l * h * h + 12 * l * h * s + 6 * h * v


def peak_tflops(logging: LoggingConfig, training: TrainingConfig, device: torch.device) -> float | None:
    """``logging.peak_tflops`` if set, else the device's dense peak (halved for fp32)."""
    if logging.peak_tflops:
        return logging.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value if training.precision != "fp32" else value / 2
    return None


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


@dataclass
class RunLogger:
    """Rank-0 logging. Every step goes to metrics.jsonl; every log_interval to console/TB."""

    cfg: Config
    world_size: int
    device: torch.device
    start_step: int
    enabled: bool = True
    train_steps: int = 0
    """The run's length (``Schedule.train_steps``; 0: the config's ``training.train_steps``)."""
    _tb: Any = None
    _bar: Any = None
    _t0: float = field(default_factory=time.perf_counter)
    _tokens_since: int = 0
    _t_last: float = field(default_factory=time.perf_counter)
    extra_keys: tuple[str, ...] = ()
    """The objective's per-step metrics (fine-tuning: lm_loss, task_loss, task_acc)."""

    def __post_init__(self) -> None:
        self.train_steps = self.train_steps or self.cfg.training.train_steps
        if not self.enabled:
            return
        run_dir = self.cfg.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed by close()
        if self.cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if self.cfg.logging.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=self.train_steps, initial=self.start_step,
                             desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
        self._peak = peak_tflops(self.cfg.logging, self.cfg.training, self.device)
        self._fpt = flops_per_token(self.cfg.model, self.cfg.parallel, self.cfg.sequence_length)

    def resume_at(self, step: int) -> None:
        """The progress bar and the rate/ETA clock start where a resumed run stands."""
        self.start_step = step
        if self._bar is not None:
            self._bar.n = step

    def step(self, record: dict[str, Any], tokens: int) -> None:
        if not self.enabled:
            return
        self._tokens_since += tokens
        step = record["step"]
        record["ppl"] = math.exp(min(record["loss"], 50.0)) if math.isfinite(record["loss"]) else float("nan")
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        if step % self.cfg.logging.log_interval and step != self.train_steps:
            return
        now = time.perf_counter()
        dt, self._t_last = now - self._t_last, now
        tok_s = self._tokens_since / max(dt, 1e-9)
        self._tokens_since = 0
        tflops = self._fpt * tok_s / self.world_size / 1e12
        extra = {"tokens_per_s": tok_s, "tflops_per_rank": tflops, "memory_gb": memory_gb(self.device)}
        if self._peak:
            extra["mfu"] = tflops / self._peak
        left = self.train_steps - step
        per_step = (now - self._t0) / max(1, step - self.start_step)
        msg = (f"step {step:>6}/{self.train_steps} | loss {record['loss']:.4f} | "
               f"ppl {record['ppl']:.2f} | lr {record['lr']:.3e} | gnorm {record['grad_norm']:.3f} | "
               f"scale {record['loss_scale']:g} | skipped {record['skipped']} | "
               + "".join(f"{k} {record[k]:.4f} | " for k in self.extra_keys if k in record)
               + f"{tok_s:,.0f} tok/s | {tflops:.3f} TFLOP/s/rank"
               + (f" | MFU {extra['mfu']:.1%}" if "mfu" in extra else "")
               + f" | mem {extra['memory_gb']:.2f} GB | ETA {left * per_step / 60:.1f} min")
        self.write(msg)
        if self._tb is not None:
            for key in ("loss", "ppl", "lr", "grad_norm", "loss_scale", "skipped", *self.extra_keys):
                if key in record:
                    self._tb.add_scalar(f"train/{key}", record[key], step)
            for key, value in extra.items():
                self._tb.add_scalar(f"perf/{key}", value, step)

    def eval(self, step: int, results: float | dict[str, float]) -> None:
        """Validation: pretraining's loss (and perplexity), or an objective's named metrics."""
        if not self.enabled:
            return
        if not isinstance(results, dict):
            results = {"loss": results}
        if set(results) == {"loss"}:
            loss = results["loss"]
            ppl = math.exp(min(loss, 50.0))
            self._jsonl.write(json.dumps({"step": step, "val_loss": loss, "val_ppl": ppl}) + "\n")
            self.write(f"step {step:>6} | validation loss {loss:.4f} | ppl {ppl:.2f}")
            scalars = {"loss": loss, "ppl": ppl}
        else:
            self._jsonl.write(json.dumps({"step": step, "val_loss": results.get("task_loss", results.get("loss")),
                                          "val_metrics": results}) + "\n")
            self.write(f"step {step:>6} | validation " + " | ".join(f"{k} {v:.4f}" for k, v in results.items()))
            scalars = results
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"valid/{key}", value, step)

    def results(self, results: dict[str, Any]) -> None:
        """The final table of a fine-tuning run: console, TensorBoard (text + scalars)."""
        if not self.enabled:
            return
        rows = [("split", "metric", "value")]
        for split in ("valid", "majority_baseline", "test"):
            for k, v in (results.get(split) or {}).items():
                rows.append((split, k, f"{v:.4f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        table = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
        table.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        self.write("results (" + str(self.cfg.run_dir / "results.json") + "):\n" + "\n".join(table))
        if self._tb is not None:
            self._tb.add_text("results", "\n".join(table), results.get("final_step", 0))
            for split in ("valid", "test"):
                for k, v in (results.get(split) or {}).items():
                    self._tb.add_scalar(f"final_{split}/{k}", v, results.get("final_step", 0))

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._jsonl.close()
        plot_loss(self.cfg.run_dir)


def read_metrics(run_dir: Path) -> tuple[dict[int, dict[str, Any]], dict[int, float]]:
    """Per-step records (the last record for a step wins, as after a restart) and val losses."""
    train: dict[int, dict[str, Any]] = {}
    val: dict[int, float] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return train, val
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            val[rec["step"]] = rec["val_loss"]
        else:
            train[rec["step"]] = rec
    return train, val


def plot_loss(run_dir: Path) -> Path | None:
    """loss.png beside metrics.jsonl: training loss per step and validation loss."""
    train, val = read_metrics(run_dir)
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = sorted(train)
    ax.plot(steps, [train[s]["loss"] for s in steps], label="train loss", lw=1.2)
    if val:
        vs = sorted(val)
        ax.plot(vs, [val[s] for s in vs], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
