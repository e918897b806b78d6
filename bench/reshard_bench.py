#!/usr/bin/env python
"""Resuming in another layout (issue 19): gpt_dist's layout-free state vs DeepSpeed's universal
checkpoint, on configs/gpt2_124m.json's model (124M parameters, nothing about it shrunk), in
one run (about 3 minutes on 2 CPU cores; a few GB of disk, deleted at the end).

    python bench/reshard_bench.py [--seq 64] [--work DIR --keep] [--no-ds] [--no-append]

1. **Save.** The model trains one step under ZeRO-1 at 2 ranks (tp=1, dp=2; fp32 on the CPU,
   micro batch 1, ``--seq`` tokens) and saves: a committed checkpoint, which holds
   DeepSpeed's files and the layout-free ``lf_*.safetensors``. Timed per rank: the whole save
   (``training.checkpoint.save``), DeepSpeed's ``save_checkpoint`` in it, ``reshard.
   write_state`` (split into gathering the full tensors and writing the files) and hashing
   the files for the manifest; bytes on disk of each kind of file.
2. **Resharded load.** New runs (the real trainer) resume that checkpoint in other layouts:
   1 rank ZeRO-1 (the lost-node case), 1 rank ZeRO-0, 2 ranks tp=2 ZeRO-1. The layout
   differs, so ``resume`` goes through ``reshard.read_state``, measured alone.
3. **DeepSpeed's converter** (``python -m deepspeed.checkpoint.ds_to_universal``) on the same
   checkpoint: as saved, with its ``--inject_missing_state``, and on the copy that
   ``_ds_universal.ds_converter_input`` adapts (its docstring says why); then DeepSpeed loads
   the universal checkpoint (``"checkpoint": {"load_universal": true}``,
   ``engine.load_checkpoint``) at 1 rank ZeRO-1 and 2 ranks tp=2 ZeRO-1, measured like 2.

After each load, the fp32 weight and both Adam moments of a few parameters (``CHECKED``) are
compared with the saved layout-free files, sliced for the rank (0.0: the load is right).

Memory (``_rss.py``): each rank's resident set, its high-water mark reset on entry to the
measured call and read on exit ("peak"), with the RSS on entry and on exit; "transient" is
the peak above the larger of the two (what the call holds only while it runs; the rest of
the rise, mostly the Adam moments a load creates, stays). RSS counts the touched pages of
memory-mapped files (safetensors reads through mmap): page cache, reclaimable, but resident,
so their peak is shown too. Heap space freed earlier and reused by the call does not show.
The converter's peak is ``/usr/bin/time -v``'s maximum RSS (one worker of each kind: one
process). Every rank is a process of its own (``--worker``, started by the main process with
the torch.distributed environment), so each phase starts with a fresh resident set.

Target (issue 19): no slower than DeepSpeed's converter; a load's peak per rank under 2x the
largest parameter's fp32 tensor plus its two Adam moments (wte, 50257 x 768: 3 x 154 MB).
Figures and the machine go into BENCHMARKS.md unless --no-append.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _ds_universal import ds_converter_input, run_converter  # bench/ is on sys.path when a bench script runs
from _machine import cpu_name
from _rss import measured, status_kb, timed_only

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "gpt2_124m.json"
SECTION = "## Resuming in another layout (issue 19)"
MB = 1e6

# phase -> (world size, tp, ZeRO stage)
LOADS: dict[str, tuple[int, int, int]] = {
    "load_w1_z1": (1, 1, 1),
    "load_w1_z0": (1, 1, 0),
    "load_w2_tp2_z1": (2, 2, 1),
}
DS_LOADS: dict[str, tuple[int, int, int]] = {
    "ds_universal_load_w1_z1": (1, 1, 1),
    "ds_universal_load_w2_tp2_z1": (2, 2, 1),
}
CHECKED = ("wte.weight", "h.0.attn.c_attn.weight", "h.11.mlp.c_proj.weight")
"""Parameters whose loaded state is compared with the checkpoint's after every load."""


# --------------------------------------------------------------------------- data and config


def make_data(work: Path, seq: int) -> tuple[str, str]:
    """(shard prefix, tokenizer dir): a small sentencepiece tokenizer (any tokenizer whose
    vocabulary fits the model's; only its fingerprint is checked against the shards) and one
    shard of random token ids below GPT-2's 50257."""
    import numpy as np

    from gpt_dist.data.indexed import ShardWriter
    from gpt_dist.data.sample_corpus import write_sample_corpus
    from gpt_dist.tokenizer import load_tokenizer, train_tokenizer

    tok_dir = work / "tokenizer"
    if not (tok_dir / "gpt_dist_tokenizer.json").exists():
        corpus = work / "corpus.jsonl"
        write_sample_corpus(corpus, max_bytes=10**9, packages=False, max_docs=150)
        train_tokenizer([corpus], 512, tok_dir, num_threads=2)
    tok = load_tokenizer(tok_dir)
    prefix = work / "shards" / "random"
    if not Path(str(prefix) + ".idx").exists():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        rs = np.random.RandomState(0)
        writer = ShardWriter(str(prefix), vocab_size=50257, eod_id=tok.eod_id,
                             tokenizer_fingerprint=tok.fingerprint, dtype=np.uint16)
        for _ in range(64):
            writer.add_document(np.append(rs.randint(0, 50257, size=4 * seq), tok.eod_id).astype(np.uint16))
        writer.finalize()
        writer.commit()
    return str(prefix), str(tok_dir)


def config(run_dir: Path, data: tuple[str, str], seq: int, *, tp: int, stage: int,
           load_universal: bool = False) -> Any:
    """configs/gpt2_124m.json's model unchanged; a run of one step of 2 sequences (global
    batch 2 in every layout), fp32 on the CPU, saved at that step."""
    from gpt_dist.config import load_config

    ds: dict[str, Any] = {"zero_optimization": {"stage": stage}}
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    return load_config(CONFIG, values={
        "run": {"dir": str(run_dir)},
        "parallel": {"tp": tp, "pp": 1},
        "data": {"prefixes": [data[0]], "tokenizer": data[1], "seq_len": seq, "split": "90,10,0"},
        "training": {"train_steps": 1, "micro_batch_size": 1, "global_batch_size": 2, "precision": "fp32",
                     "device": "cpu", "eval_interval": 1000, "eval_steps": 1},
        "checkpoint": {"save_interval": 1, "keep_last": 1},
        "logging": {"log_interval": 1, "tensorboard": False},
        "deepspeed": ds,
    })


# --------------------------------------------------------------------------- workers (one per rank)


def worker_save(work: Path, seq: int, out: dict[str, Any]) -> None:
    """Train one step under ZeRO-1 at tp=1 x dp=2 and save (the loop saves at the last step)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    import gpt_dist.training.checkpoint as C
    import gpt_dist.training.metrics as M
    import gpt_dist.training.reshard as R
    from gpt_dist.training.pretrain import pretrain

    M.plot_loss = lambda run_dir: None  # matplotlib's seconds are not what is measured here
    import safetensors.torch

    for key in ("save", "ds_save_checkpoint", "write_state", "full_state", "save_file", "hash_files"):
        out[key] = {}
    C.save = measured(C.save, out["save"])
    DeepSpeedEngine.save_checkpoint = timed_only(DeepSpeedEngine.save_checkpoint, out["ds_save_checkpoint"])
    R.write_state = measured(R.write_state, out["write_state"])
    # inside write_state: gathering each parameter's full tensors (DeepSpeed's safe_get_full_*,
    # an all-reduce over the data-parallel group each) and writing the files
    R._full_state = timed_only(R._full_state, out["full_state"])
    safetensors.torch.save_file = timed_only(safetensors.torch.save_file, out["save_file"])
    C._hash_files = timed_only(C._hash_files, out["hash_files"])
    t0 = time.perf_counter()
    pretrain(config(work / "source", data_of(work), seq, tp=1, stage=1))
    out["run_seconds"] = time.perf_counter() - t0


def worker_load(work: Path, seq: int, phase: str, out: dict[str, Any]) -> None:
    """Resume the source checkpoint in this phase's layout (the real trainer: the plan sees
    another layout and ``read_state`` loads the layout-free files); train_steps is the
    checkpoint's step, so the loop then ends without a step or a save."""
    import gpt_dist.training.metrics as M
    import gpt_dist.training.reshard as R
    from gpt_dist.training.hooks import TrainHooks
    from gpt_dist.training.pretrain import pretrain

    M.plot_loss = lambda run_dir: None
    _, tp, stage = LOADS[phase]
    out["read_state"] = {}
    R.read_state = measured(R.read_state, out["read_state"])
    resumed: list[bool] = []

    class Seen(TrainHooks):
        def after_resume(self, eng: Any, ctx: Any, tag_dir: Path, resharded: bool) -> None:
            resumed.append(resharded)
            out["max_abs_diff"] = compare_with_lf(eng, ctx, cfg, tag_dir)

    cfg = config(work / phase, data_of(work), seq, tp=tp, stage=stage)
    t0 = time.perf_counter()
    pretrain(cfg, hooks=Seen())
    out["run_seconds"] = time.perf_counter() - t0
    out["resharded"] = resumed == [True]


def worker_ds_load(work: Path, seq: int, phase: str, out: dict[str, Any]) -> None:
    """DeepSpeed's own route: an engine in this phase's layout loads the universal checkpoint
    ``ds_to_universal`` wrote (``"checkpoint": {"load_universal": true}``)."""
    from gpt_dist.parallel import ParallelContext
    from gpt_dist.rng import seed_all
    from gpt_dist.training.engine import build_engine

    _, tp, stage = DS_LOADS[phase]
    cfg = config(work / phase, data_of(work), seq, tp=tp, stage=stage, load_universal=True)
    with ParallelContext.from_env(cfg.parallel, device="cpu") as ctx:
        seed_all(cfg.training.seed)
        eng = build_engine(cfg, ctx)
        out["load_checkpoint"] = {}
        load = measured(eng.ds.load_checkpoint, out["load_checkpoint"])
        path, _ = load(str(work / "universal"), tag="global_step1", load_module_strict=True)
        out["loaded"] = path is not None
        out["optimizer_step"] = _first_step(eng.optimizer)
        out["lr"] = eng.optimizer.param_groups[0]["lr"]
        out["max_abs_diff"] = compare_with_lf(eng, ctx, cfg, work / "source" / "checkpoints" / "global_step1")


def compare_with_lf(eng: Any, ctx: Any, cfg: Any, tag_dir: Path) -> dict[str, float]:
    """Max |difference| between the state the engine holds now (this TP rank's fp32 weight and
    Adam moments of the ``CHECKED`` parameters) and the checkpoint's layout-free files (this
    rank's slice): 0.0 when the load put every value where it belongs."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors import safe_open

    from gpt_dist.export.loader import local_slice
    from gpt_dist.export.names import canonical_name

    out = {}
    for name, p in eng.ds.module.named_parameters():
        canon = canonical_name(name, cfg.model.n_layer)
        if canon not in CHECKED:
            continue
        if cfg.zero_stage > 0:
            have = {"fp32": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                    "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
        else:  # ZeRO-0 fp32: the torch optimizer steps the module's weights
            st = eng.optimizer.state[p]
            have = {"fp32": p.detach(), "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}
        with safe_open(str(tag_dir / f"lf_{canon}.safetensors"), framework="pt") as f:
            for key, got in have.items():
                want = local_slice(canon, f.get_tensor(key), tuple(p.shape), ctx.tensor_parallel, cfg.model,
                                   module_name=name)
                out[f"{canon} {key}"] = float((got.float().reshape(want.shape) - want).abs().max())
    return out


def _first_step(optimizer: Any) -> float | None:
    for st in optimizer.state.values():
        if isinstance(st, dict) and "step" in st:
            return float(st["step"])
    return None


def data_of(work: Path) -> tuple[str, str]:
    return str(work / "shards" / "random"), str(work / "tokenizer")


def worker(phase: str, work: Path, seq: int) -> None:
    out: dict[str, Any] = {"rank": int(os.environ.get("RANK", "0"))}
    if phase == "save":
        worker_save(work, seq, out)
    elif phase in DS_LOADS:
        worker_ds_load(work, seq, phase, out)
    else:
        worker_load(work, seq, phase, out)
    out["process_peak_rss"] = status_kb("VmHWM") * 1024  # since the last reset: see measured()
    (work / "results").mkdir(exist_ok=True)
    (work / "results" / f"{phase}_rank{out['rank']}.json").write_text(json.dumps(out, indent=1))


# --------------------------------------------------------------------------- the main process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(phase: str, world: int, work: Path, seq: int) -> tuple[float, list[dict[str, Any]]]:
    """Run ``phase`` on ``world`` rank processes; (wall seconds, each rank's results)."""
    port = free_port()
    procs = []
    t0 = time.perf_counter()
    log = (work / "logs" / f"{phase}.log").open("w")
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world)), "DS_ACCELERATOR": "cpu",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, __file__, "--worker", phase, "--work", str(work), "--seq", str(seq)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    log.close()
    wall = time.perf_counter() - t0
    if any(codes):
        tail = (work / "logs" / f"{phase}.log").read_text()[-3000:]
        raise RuntimeError(f"phase {phase}: exit codes {codes}; log {work / 'logs' / (phase + '.log')}:\n{tail}")
    results = [json.loads((work / "results" / f"{phase}_rank{r}.json").read_text()) for r in range(world)]
    return wall, results


def link_checkpoint(src_run: Path, dst_run: Path, tag: str) -> None:
    """``dst_run`` holds only ``src_run``'s checkpoint ``tag`` (hard links: no copy, and
    nothing writes to a committed checkpoint) and the run's manifest key."""
    src, dst = src_run / "checkpoints", dst_run / "checkpoints"
    shutil.rmtree(dst_run, ignore_errors=True)
    shutil.copytree(src / tag, dst / tag, copy_function=os.link)
    shutil.copy2(src / ".manifest_key", dst / ".manifest_key")
    (dst / "latest").write_text(tag)


def disk_bytes(tag_dir: Path) -> dict[str, int]:
    sizes = {"layout-free lf_*.safetensors": 0, "DeepSpeed model states": 0, "DeepSpeed optimizer states": 0,
             "other (rng, manifest)": 0}
    for p in tag_dir.iterdir():
        n = p.stat().st_size
        if p.name.startswith("lf_"):
            sizes["layout-free lf_*.safetensors"] += n
        elif "optim_states" in p.name:
            sizes["DeepSpeed optimizer states"] += n
        elif "model_states" in p.name:
            sizes["DeepSpeed model states"] += n
        else:
            sizes["other (rng, manifest)"] += n
    return sizes


def machine() -> str:
    import deepspeed
    import torch

    ram = "?"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            ram = f"{int(line.split()[1]) / 2**20:.0f} GiB RAM"
    cores = len(os.sched_getaffinity(0))
    return f"{cpu_name()} ({cores} cores), {ram}, torch {torch.__version__}, DeepSpeed {deepspeed.__version__}"


def mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / MB:,.0f}"


def memory_row(what: str, layout: str, results: list[dict[str, Any]], key: str) -> str:
    """One table row: per rank (``a / b``) seconds, RSS on entry, peak RSS, RSS on exit, the
    peak above the larger of entry and exit (the call's transient memory) and the peak of the
    file-backed part (memory-mapped files)."""
    def col(fn: Callable[[dict[str, Any]], Any]) -> str:
        return " / ".join(fn(r[key]) for r in results)
    secs = col(lambda m: f"{m['seconds']:.2f}")
    return (f"| {what} | {layout} | {secs} | {col(lambda m: mb(m['baseline_rss']))} | "
            f"{col(lambda m: mb(m['peak_rss']))} | {col(lambda m: mb(m['end_rss']))} | "
            f"{col(lambda m: mb(transient(m)))} | {col(lambda m: mb(m['peak_file']))} |")


def transient(m: dict[str, Any]) -> int:
    return int(m["peak_rss"] - max(m["baseline_rss"], m["end_rss"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence (the model is not shrunk)")
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a new one in /tmp)")
    ap.add_argument("--loads", default=",".join(LOADS), help="resharded-load layouts to run, of " + ",".join(LOADS))
    ap.add_argument("--ds-loads", default=",".join(DS_LOADS), help="universal-load layouts, of " + ",".join(DS_LOADS))
    ap.add_argument("--no-ds", action="store_true", help="skip DeepSpeed's converter and universal load")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (several GB)")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.work, args.seq)
        return

    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="reshard_bench-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "results", ignore_errors=True)
    t_start = time.perf_counter()
    make_data(work, args.seq)
    print(f"work directory {work}", flush=True)

    # 1. train and save at 2 ranks
    shutil.rmtree(work / "source", ignore_errors=True)
    wall, save = launch("save", 2, work, args.seq)
    tag = "global_step1"
    tag_dir = work / "source" / "checkpoints" / tag
    sizes = disk_bytes(tag_dir)
    manifest = json.loads((tag_dir / "manifest.json").read_text())
    shapes = manifest["layout_free"]["params"]
    n_params = sum(math.prod(s) for s in shapes.values())
    big_name, big_shape = max(shapes.items(), key=lambda kv: math.prod(kv[1]))
    big_bytes = 3 * 4 * math.prod(big_shape)  # fp32 + two moments
    target = 2 * big_bytes
    print(f"saved {tag_dir} ({wall:.0f} s with start-up); {n_params:,} parameters", flush=True)

    # 2. resharded loads
    loads: dict[str, list[dict[str, Any]]] = {}
    for phase in [p for p in args.loads.split(",") if p]:
        link_checkpoint(work / "source", work / phase, tag)
        wall, loads[phase] = launch(phase, LOADS[phase][0], work, args.seq)
        print(f"{phase}: {wall:.0f} s with start-up", flush=True)
        shutil.rmtree(work / phase, ignore_errors=True)

    # 3. DeepSpeed's converter (as it is, then with its own flag, then on the adapted input)
    #    and its universal load
    convs: list[dict[str, Any]] = []
    adapt_s: float | None = None
    ds_loads: dict[str, list[dict[str, Any]]] = {}
    if not args.no_ds:
        out_dir, log = work / "universal" / tag, work / "logs" / "ds_to_universal.log"
        log.unlink(missing_ok=True)
        convs.append({**run_converter(tag_dir, out_dir, log), "input": "the checkpoint as saved"})
        convs.append({**run_converter(tag_dir, out_dir, log, "--inject_missing_state"),
                      "input": "the checkpoint as saved"})
        adapt_s = ds_converter_input(tag_dir, work / "ds_input" / tag, manifest["config"]["model"]["vocab_size"],
                                     manifest["config"]["model"]["n_layer"])
        convs.append({**run_converter(work / "ds_input" / tag, out_dir, log),
                      "input": f"adapted (`_extra_state` dropped, `universal_checkpoint_info` declared: {adapt_s:.1f} s)"})
        for c in convs:
            print(f"ds_to_universal {c['flags']} on {c['input']}: rc {c['rc']}, {c['seconds']:.1f} s, {c['error']}",
                  flush=True)
        if convs[-1]["rc"] == 0:
            for phase in [p for p in args.ds_loads.split(",") if p]:
                try:
                    wall, ds_loads[phase] = launch(phase, DS_LOADS[phase][0], work, args.seq)
                    print(f"{phase}: {wall:.0f} s with start-up", flush=True)
                except RuntimeError as exc:
                    print(f"DeepSpeed universal load {phase} failed: {exc}", flush=True)

    # ---- report
    rows = [("| what | layout (per rank: a / b) | seconds | RSS on entry MB | peak RSS MB | RSS on exit MB | "
             "transient MB (peak - max(entry, exit)) | peak file-backed RSS MB |"),
            "|---|---|---|---|---|---|---|---|"]
    rows.append(memory_row("whole save (`training.checkpoint.save`)", "tp1 dp2 ZeRO-1", save, "save"))
    rows.append("| - of which DeepSpeed's `save_checkpoint` | | "
                + " / ".join(f"{r['ds_save_checkpoint']['seconds']:.2f}" for r in save) + " | | | | | |")
    rows.append(memory_row("- of which the layout-free files (`reshard.write_state`)", "", save, "write_state"))
    rows.append("| - - gathering full tensors (`safe_get_full_*`, all-reduce over dp) | | "
                + " / ".join(f"{r['full_state']['seconds']:.2f}" for r in save) + " | | | | | |")
    rows.append("| - - writing lf_* files (`safetensors.torch.save_file`) | | "
                + " / ".join(f"{r['save_file'].get('seconds', 0.0):.2f}" for r in save) + " | | | | | |")
    rows.append("| - of which hashing the files for the manifest | | "
                + " / ".join(f"{r['hash_files']['seconds']:.2f}" for r in save) + " | | | | | |")
    for phase, res in loads.items():
        world, tp, stage = LOADS[phase]
        ok = "" if all(r["resharded"] for r in res) else " (NOT resharded!)"
        rows.append(memory_row(f"resharded load (`reshard.read_state`){ok}", f"{world} rank(s) tp{tp} ZeRO-{stage}",
                               res, "read_state"))
    for c in convs:
        status = "ok" if c["rc"] == 0 else f"fails: `{c['error']}`"
        rows.append(f"| DeepSpeed `ds_to_universal {c['flags']}` on {c['input']}: {status} | offline, 1 process | "
                    f"{c['seconds']:.2f} | | {mb(c['peak_rss'])} | | | |")
    for phase, res in ds_loads.items():
        world, tp, stage = DS_LOADS[phase]
        rows.append(memory_row("DeepSpeed universal load (`load_checkpoint`, `load_universal`)",
                               f"{world} rank(s) tp{tp} ZeRO-{stage}", res, "load_checkpoint"))
    checks = []
    for phase, res in [*loads.items(), *ds_loads.items()]:
        worst = max(v for r in res for v in r["max_abs_diff"].values())
        checks.append(f"{phase} {worst:g}")
    disk = "; ".join(f"{k} {mb(v)} MB" for k, v in sizes.items())
    if convs and convs[-1].get("bytes"):
        disk += f"; DeepSpeed's universal checkpoint (converted) {mb(convs[-1]['bytes'])} MB"
    summary = [(f"- parameters {n_params:,}; the largest, {big_name} {big_shape}: fp32 + 2 moments = "
                f"{mb(big_bytes)} MB; target for a load's peak per rank: under 2x that = {mb(target)} MB"),
               ("- loaded state vs the saved one (max |difference| over fp32, exp_avg, exp_avg_sq of "
                f"{', '.join(CHECKED)}): " + "; ".join(checks))]
    if loads:
        worst_t = max(transient(r["read_state"]) for res in loads.values() for r in res)
        worst_g = max(r["read_state"]["peak_rss"] - r["read_state"]["baseline_rss"] for res in loads.values() for r in res)
        summary.append(f"- resharded load, largest transient over ranks and layouts: {mb(worst_t)} MB "
                       f"({'under' if worst_t < target else 'OVER'} the target); largest peak above the RSS on entry "
                       f"{mb(worst_g)} MB (this includes the Adam moments the load creates, which stay)")
    if convs and convs[-1]["rc"] == 0:
        conv_s = convs[-1]["seconds"]
        lf_s = max(r["write_state"]["seconds"] for r in save)
        summary.append(f"- layout-free files at save {lf_s:.2f} s (slowest rank, inside the save) vs DeepSpeed's "
                       f"converter {conv_s:.2f} s (a process of its own, start-up included, after the save)")
        for ours, theirs in (("load_w1_z1", "ds_universal_load_w1_z1"), ("load_w2_tp2_z1", "ds_universal_load_w2_tp2_z1")):
            if ours in loads and theirs in ds_loads:
                a = max(r["read_state"]["seconds"] for r in loads[ours])
                b = max(r["load_checkpoint"]["seconds"] for r in ds_loads[theirs])
                summary.append(f"- {ours.removeprefix('load_')}: `read_state` {a:.2f} s vs DeepSpeed's universal load "
                               f"{b:.2f} s + {conv_s:.2f} s conversion")
    table = "\n".join(rows)
    cmd = "python bench/reshard_bench.py" + (f" --seq {args.seq}" if args.seq != 64 else "")
    report = (f"\n### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
              f"- command: `{cmd}` (total {time.perf_counter() - t_start:.0f} s)\n"
              f"- machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the end\n"
              f"- model: configs/gpt2_124m.json (12 x 768, vocab 50257, n_ctx 1024), fp32 on the CPU, "
              f"seq {args.seq}, micro batch 1, global batch 2, 1 step, saved under ZeRO-1 at tp=1 dp=2\n"
              f"- checkpoint on disk: {disk}\n\n{table}\n\n" + "\n".join(summary) + "\n")
    print(report)
    if not args.no_append:
        path = ROOT / "BENCHMARKS.md"
        text = path.read_text()
        if SECTION not in text:
            text += f"\n{SECTION}\n\nRun by `python bench/reshard_bench.py` (its docstring says what is measured).\n"
        path.write_text(text + report)
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
