"""DeepSpeed's universal-checkpoint route for bench/reshard_bench.py: ``ds_to_universal`` run as
a command (time and peak memory), and the copy of a checkpoint it needs to apply."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def ds_converter_input(tag_dir: Path, out_dir: Path, vocab_size: int, n_layer: int) -> float:
    """``out_dir``: the checkpoint's DeepSpeed files as ``ds_to_universal`` can read them (its
    seconds returned). Hard links, except each ``mp_rank_*_model_states.pt``, rewritten with

    1. the module entries that are not tensors left out: megatron-core's linear layers put an
       ``_extra_state`` (None: fp8 metadata, unused) in their state dict, and the converter
       calls ``.float()`` on every module entry it has no optimizer fragments for;
    2. ``universal_checkpoint_info`` (the checkpoint has none: the model declares no
       ``universal_checkpoint_info`` attribute), generated from the project's own TP table
       (``export/names.tp_dim``): the row-parallel weights (split along dim 1) and the
       vocabulary parameter with its real size (its padding depends on tp). Nothing else is
       needed from a tp=1 checkpoint; it is what lets the universal checkpoint load at tp=2.
    """
    import torch
    from deepspeed.checkpoint.constants import (
        ORIGINAL_VOCAB_SIZE,
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        VOCABULARY_PARAMETER_PATTERNS,
    )

    from gpt_dist.export.names import canonical_name, tp_dim

    t0 = time.perf_counter()
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    for f in tag_dir.iterdir():
        if f.suffix != ".pt" or f.name.startswith("rng_"):
            continue
        if "model_states" not in f.name:
            os.link(f, out_dir / f.name)
            continue
        sd = torch.load(f, map_location="cpu", weights_only=False)
        module = sd["module"]
        sd["module"] = {k: v for k, v in module.items() if torch.is_tensor(v)}
        canon = {k: canonical_name(k, n_layer) for k in sd["module"]}
        rows = sorted(k for k, c in canon.items() if c is not None and tp_dim(c) == 1)
        vocab = sorted(k for k, c in canon.items() if c == "wte.weight")
        sd[UNIVERSAL_CHECKPOINT_INFO] = {
            UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: ["^(" + "|".join(map(re.escape, rows)) + ")$"],
            VOCABULARY_PARAMETER_PATTERNS: ["^(" + "|".join(map(re.escape, vocab)) + ")$"],
            ORIGINAL_VOCAB_SIZE: vocab_size,
        }
        torch.save(sd, out_dir / f.name)
    return time.perf_counter() - t0


def run_converter(input_dir: Path, out_dir: Path, log: Path, *flags: str) -> dict[str, Any]:
    """``ds_to_universal`` on ``input_dir`` (one worker of each kind: one process, so its
    maximum RSS is the conversion's peak): wall seconds, peak RSS, exit code, the error."""
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(input_dir),
           "--output_folder", str(out_dir), "--num_extract_workers", "1", "--num_merge_workers", "1", *flags]
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    t0 = time.perf_counter()
    proc = subprocess.run(timer + cmd, check=False, capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    wall = time.perf_counter() - t0
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if re.match(r"^\w*(Error|Exception)\b", ln)]
    if proc.returncode:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"flags": " ".join(flags), "rc": proc.returncode, "seconds": wall,
            "peak_rss": int(m.group(1)) * 1024 if m else None, "error": errors[-1] if errors else None,
            "bytes": tree_bytes(out_dir) if out_dir.exists() else None}


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
