"""The staged job's one-task stages, ``components`` and ``finalize``, and its drivers
(see gpt_dist.data.staged).

``components`` reads every key partition's shared keys and applies the single-node rule
in document-id order (:func:`_greedy_drops`); it holds only the documents that share a
key with another, 8 bytes per id and per group membership.

``finalize`` puts every task's shards under the output prefix in task order (= input
order), numbered ``PREFIX_00000...`` as the single-node command numbers them: ``.bin`` and
``.idx`` are hard links into the work directory (copies when it is on another file
system), the sidecar a new file with the shard's global number, the ``.idx`` last; it then
validates every shard, writes ``PREFIX.rejected.jsonl`` with absolute line numbers and
the manifest training reads (``gpt_dist.data.shardset``), with the counters summed.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from gpt_dist.data import indexed
from gpt_dist.data.preprocess import MANIFEST_FORMAT, PreprocessConfig, manifest_counts
from gpt_dist.data.staged import (
    OFFSET_BITS,
    PER_TASK,
    STAGES,
    StageError,
    bands_stage,
    config_from_plan,
    finish_task,
    keys_stage,
    load_plan,
    plan_stage,
    read_marker,
    require_task,
    task_ranges,
    tokenize_stage,
)
from gpt_dist.utils import atomic_open


def _greedy_drops(ex_k: np.ndarray, ex_d: np.ndarray, nr_k: np.ndarray, nr_d: np.ndarray,
                  chunk: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """(dropped ids sorted, kinds: 1 exact, 2 near): the single-node rule in id order.

    Groups are numbered (exact ones first); the (document, group) pairs are sorted by
    document, and a document is visited once with all its groups. The loop is Python,
    over ``chunk`` documents' pairs at a time as lists, so memory stays at the arrays'
    16 bytes per pair plus one chunk."""
    _, ex_g = np.unique(ex_k, return_inverse=True)
    _, nr_g = np.unique(nr_k, return_inverse=True)
    n_ex = int(ex_g.max()) + 1 if len(ex_g) else 0
    n_nr = int(nr_g.max()) + 1 if len(nr_g) else 0
    docs = np.concatenate((ex_d, nr_d))
    groups = np.concatenate((ex_g, nr_g + n_ex)).astype(np.int64)
    del ex_g, nr_g
    order = np.lexsort((groups, docs))
    docs, groups = docs[order], groups[order]
    del order
    kept = bytearray(n_ex + n_nr)  # 1: the group has a kept document
    dropped: list[int] = []
    kinds: list[int] = []
    bounds = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1], True]) if len(docs) else np.zeros(1, np.int64)
    for c0 in range(0, len(bounds) - 1, chunk):
        c1 = min(c0 + chunk, len(bounds) - 1)
        lo, hi = int(bounds[c0]), int(bounds[c1])
        doc_list, group_list = docs[lo:hi].tolist(), groups[lo:hi].tolist()
        cut = (bounds[c0:c1 + 1] - lo).tolist()
        for a, b in itertools.pairwise(cut):
            g = group_list[a:b]
            if any(kept[x] for x in g if x < n_ex):
                dropped.append(doc_list[a])
                kinds.append(1)
            elif any(kept[x] for x in g if x >= n_ex):
                dropped.append(doc_list[a])
                kinds.append(2)
            else:
                for x in g:
                    kept[x] = 1
    return np.asarray(dropped, dtype=np.uint64), np.asarray(kinds, dtype=np.uint8)


def _id_bounds(r: dict[str, Any]) -> tuple[int, int]:
    """Document ids of range ``r``: (low, high], end offsets in (start, end]."""
    base = r["file"] << OFFSET_BITS
    if r["end"] < 0:
        return base - 1 if base else -1, base + (1 << OFFSET_BITS) - 1
    return base + r["start"], base + r["end"]


def components_stage(work: str | Path) -> dict[str, Any]:
    work = Path(work)
    plan = load_plan(work)
    if (done := read_marker(work, "components", 0, plan)) is not None:
        return done
    (work / "components").mkdir(parents=True, exist_ok=True)
    parts = [require_task(work, "bands", p, plan) for p in range(plan["tasks"])]
    arrays: dict[str, list[np.ndarray]] = {k: [] for k in ("ex_k", "ex_d", "nr_k", "nr_d")}
    for p in range(len(parts)):
        with np.load(work / "bands" / f"{p:05d}.npz", allow_pickle=False) as z:
            for k, found in arrays.items():
                found.append(z[k])
    cat = {k: np.concatenate(v) if v else np.zeros(0, np.uint64) for k, v in arrays.items()}
    dropped, kinds = _greedy_drops(cat["ex_k"], cat["ex_d"], cat["nr_k"], cat["nr_d"])
    outputs = []
    for t in range(plan["tasks"]):
        sel = np.zeros(len(dropped), bool)
        for r in task_ranges(plan, t):
            lo, hi = _id_bounds(r)
            mask = dropped <= np.uint64(hi)
            if lo >= 0:
                mask &= dropped > np.uint64(lo)
            sel |= mask
        name = f"drop_{t:05d}.npy"
        with atomic_open(work / "components" / name, "wb") as f:
            np.save(f, dropped[sel], allow_pickle=False)
        outputs.append(name)
    return finish_task(work, "components", 0, plan, outputs,
                   {"duplicates": {"exact": int((kinds == 1).sum()), "near": int((kinds == 2).sum())},
                    "group_pairs": int(sum(len(v) for k, v in cat.items() if k.endswith("_d")))})



def _place(src: Path, dst: str) -> None:
    """``dst`` becomes ``src``'s bytes: a hard link (a copy across file systems), atomically."""
    tmp = dst + ".link.tmp"
    Path(tmp).unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _numbered(prefix: str) -> list[int]:
    pattern = re.compile(re.escape(Path(prefix).name) + r"_(\d{5,})\.(bin|idx|meta\.json)")
    return sorted({int(m.group(1)) for p in Path(prefix).parent.glob(Path(prefix).name + "_*")
                   if (m := pattern.fullmatch(p.name))})


def finalize_stage(work: str | Path) -> dict[str, Any]:
    work = Path(work)
    plan = load_plan(work)
    cfg = config_from_plan(plan)
    prefix = str(cfg.output_prefix)
    manifest_path = Path(prefix + ".manifest.json")
    if read_marker(work, "finalize", 0, plan) is not None and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("config_key") == plan["config_key"]:
            manifest["already_complete"] = True
            return manifest
    n = plan["tasks"]
    keys = [require_task(work, "keys", t, plan) for t in range(n)]
    comp = require_task(work, "components", 0, plan)
    toks = [require_task(work, "tokenize", t, plan) for t in range(n)]
    (work / "finalize").mkdir(parents=True, exist_ok=True)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    for k in _numbered(prefix):
        try:
            meta = indexed.read_sidecar(indexed.shard_prefix(prefix, k)) or {}
        except indexed.ShardFormatError:
            meta = {}
        if meta.get("config_key") != plan["config_key"] and not cfg.overwrite:
            raise StageError(f"{indexed.shard_prefix(prefix, k)}: files of another run are at this prefix; "
                             "use --overwrite or another --output-prefix")
    manifest_path.unlink(missing_ok=True)  # the set is incomplete until the new manifest is written
    placed: list[str] = []
    for t, m in enumerate(toks):
        for s in m["shards"]:
            src = work / "tokenize" / f"{t:05d}" / s
            dst = indexed.shard_prefix(prefix, len(placed))
            meta = json.loads(Path(f"{src}.meta.json").read_text(encoding="utf-8"))
            meta["shard_index"] = len(placed)
            Path(dst + ".idx").unlink(missing_ok=True)  # invisible while its files change
            _place(Path(f"{src}.bin"), dst + ".bin")
            indexed.atomic_write_json(str(indexed.sidecar_path(dst)), meta)
            _place(Path(f"{src}.idx"), dst + ".idx")
            placed.append(dst)
    for k in _numbered(prefix):
        if k >= len(placed):
            indexed.remove_shard_files(indexed.shard_prefix(prefix, k))
    for sp in placed:
        try:
            indexed.validate_shard(sp, require_sidecar=True)
        except indexed.ShardFormatError as exc:
            raise StageError(str(exc)) from None
    counts: Counter[str] = Counter()
    for m in keys + toks:
        counts.update({k: v for k, v in m["counts"].items() if k not in ("candidates", "dropped")})
    counts["duplicate_exact"] = comp["duplicates"]["exact"]
    counts["duplicate_near"] = comp["duplicates"]["near"]
    if counts["documents"] == 0:
        raise StageError(f"{plan['files'][0]['path']}: no document survived (rejected {counts['rejected']}, "
                         f"filtered {counts['filtered']}, duplicates {comp['duplicates']}); "
                         f"see {prefix}.rejected.jsonl")
    _write_rejects(work, plan, keys, Path(prefix + ".rejected.jsonl"))
    peak = max((json.loads((work / "bands" / f"{p:05d}.done").read_text())["peak_key_bytes"]
                for p in range(n)), default=0)
    manifest = _manifest(plan, cfg, placed, counts, peak)
    indexed.atomic_write_json(manifest_path, manifest)
    finish_task(work, "finalize", 0, plan, [], {"shards": len(placed)})
    return manifest


def _write_rejects(work: Path, plan: dict[str, Any], keys: list[dict[str, Any]], path: Path) -> None:
    """Every task's rejected lines in input order, line numbers made absolute."""
    before: dict[int, int] = {}  # newlines in the file before each range
    offset = []
    for t in range(plan["tasks"]):
        own = [r for r in plan["ranges"] if r["task"] == t]
        for r, lines in zip(own, keys[t]["lines"]):
            offset.append((t, before.get(r["file"], 0)))
            before[r["file"]] = before.get(r["file"], 0) + lines
    by_task: dict[int, list[int]] = {}
    for t, off in offset:
        by_task.setdefault(t, []).append(off)
    with atomic_open(path, "wb") as out:
        for t in range(plan["tasks"]):
            own = [r for r in plan["ranges"] if r["task"] == t]
            with open(work / "keys" / f"{t:05d}.rejected.jsonl", encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line)
                    k = rec.pop("range")
                    row = {"file": plan["files"][own[k]["file"]]["path"], "line": by_task[t][k] + rec.pop("line"),
                           **rec}
                    out.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def _manifest(plan: dict[str, Any], cfg: PreprocessConfig, placed: list[str], c: Counter[str],
              peak: int) -> dict[str, Any]:
    """The single-node command's manifest (gpt_dist.data.preprocess), plus ``staged``."""
    shards = []
    for sp in placed:
        meta = indexed.read_sidecar(sp) or {}
        shards.append({"prefix": os.path.basename(sp), **{key: meta.get(key) for key in (
            "num_documents", "num_tokens", "bin_bytes", "bin_sha256", "idx_bytes", "idx_sha256", "max_token_id")}})
    seconds = max(time.time() - plan["created"], 1e-9)
    return {
        "format": MANIFEST_FORMAT, "version": 1, "config_key": plan["config_key"],
        "output_prefix": os.path.basename(str(cfg.output_prefix)), "dtype": plan["dtype"], "shards": shards,
        # sha256 of a whole input would make one task read the whole corpus: size and mtime instead
        "inputs": [{"path": f["path"], "size": f["size"], "mtime_ns": f["mtime_ns"], "sha256": None}
                   for f in plan["files"]],
        "tokenizer": {"path": str(cfg.tokenizer), **{k: plan["tokenizer"][k] for k in
                                                      ("kind", "fingerprint", "vocab_size", "eod_id")}},
        "settings": cfg.output_settings(),
        "counts": manifest_counts(c),
        "dedup_memory_bytes": peak,
        "timing": {"seconds": round(seconds, 3), "pipeline_seconds": round(seconds, 3), "workers": cfg.workers,
                   "resumed_from_shard": 0, "mb_per_s": round(c["input_bytes"] / 1e6 / seconds, 3),
                   "docs_per_s": round(c["records"] / seconds, 1), "tokens_per_s": round(c["tokens"] / seconds, 1)},
        "staged": {"tasks": plan["tasks"], "plan_key": plan["plan_key"]},
    }


def run_stage(stage: str, work: str | Path, task: int = 0, cfg: PreprocessConfig | None = None,
              tasks: int | None = None) -> dict[str, Any]:
    """One task of one stage (what one Slurm array element runs)."""
    if stage == "plan":
        if cfg is None or tasks is None:
            raise StageError("--stage plan needs the preprocessing options and --tasks")
        return plan_stage(cfg, work, tasks)
    if stage == "keys":
        return keys_stage(work, task)
    if stage == "bands":
        return bands_stage(work, task)
    if stage == "components":
        return components_stage(work)
    if stage == "tokenize":
        return tokenize_stage(work, task)
    if stage == "finalize":
        return finalize_stage(work)
    raise StageError(f"--stage {stage}: not a stage")


def run_all(cfg: PreprocessConfig, work: str | Path, tasks: int) -> dict[str, Any]:
    """Every stage and task in this process, in order (what the Slurm chain does)."""
    plan_stage(cfg, work, tasks)
    for stage in ("keys", "bands"):
        for t in range(tasks):
            run_stage(stage, work, t)
    components_stage(work)
    for t in range(tasks):
        tokenize_stage(work, t)
    return finalize_stage(work)


def status(work: str | Path) -> tuple[bool, list[str]]:
    """(complete?, lines): tasks complete per stage, and for the first incomplete stage each
    missing task with its log and the log's last line (what slurm/preprocess.sh's report
    job prints when the chain stopped)."""
    work = Path(work)
    plan = load_plan(work)
    lines = []
    for stage in STAGES[1:]:
        n = plan["tasks"] if stage in PER_TASK else 1
        missing = [t for t in range(n) if read_marker(work, stage, t, plan) is None]
        lines.append(f"{stage}: {n - len(missing)}/{n} tasks complete")
        for t in missing:
            log = work / "logs" / f"{stage}_{t}.out"
            try:
                tail = [x for x in log.read_text(errors="replace").splitlines() if x.strip()][-1:]
                last = tail[0] if tail else "(empty log)"
            except FileNotFoundError:
                last = "(no log: never started)"
            lines.append(f"  {stage} task {t}: {log}: {last}")
        if missing:
            return False, lines
    return True, lines
