"""Preprocessing as a staged job: six stages whose tasks Slurm runs as job arrays.

    plan        one task: the inputs cut into byte ranges aligned to line ends (gzip and
                text files whole), assigned to ``tasks`` tasks; ``plan.json``
    keys        per task: read, clean, filter its ranges; exact and MinHash band keys of
                every candidate document, written sorted and split into ``tasks``
                key partitions; its rejected lines and counters
    bands       per key partition: merge that partition of every task's keys and keep the
                keys that two or more documents share (the duplicate groups)
    components  one task: which documents the groups drop; one drop list per task
    tokenize    per task: tokenize what survives into ``.bin/.idx`` shards
    finalize    one task: the shards linked under the output prefix, renumbered, each
                ``.idx`` validated, the rejects file and one manifest

(``components``, ``finalize`` and the drivers are in gpt_dist.data.staged_merge;
``data_tools/preprocess.py --stage`` runs one task, slurm/preprocess.sh the chain.)

Why the result equals the single-node command's (tests/data_tools/test_staged.py checks
it for 1, 3 and 4 tasks): a document's id is ``file index << 40 | byte offset of its
end`` (uncompressed), global and in input order whatever the task count; and
``components`` applies the single-node rule to the groups in id order: a document is an
exact duplicate when an earlier *kept* document has its exact key, a near duplicate when
an earlier kept document shares one of its band keys, and kept otherwise. So the lowest
id of every connected group is kept, and, like the single-node command, a document whose
only resemblance is to a document that was itself dropped is kept too (a chain A~B~C with
A not like C keeps A and C).

Why files and markers: every task writes its outputs to temporary names, renames them,
then writes ``NAME.done`` (JSON with its counters and the plan's key); a rerun of a task
with a marker does nothing, a task without one starts over, and a later stage reads only
outputs whose marker exists. Memory per task is its share of the data (see docs/data.md).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from gpt_dist.data import indexed
from gpt_dist.data.clean import CleanConfig
from gpt_dist.data.dedup import DedupConfig
from gpt_dist.data.preprocess import PreprocessConfig, PreprocessError, Preprocessor
from gpt_dist.data.readers import InputFile, Position, RawRecord, iter_records
from gpt_dist.data.worker import KEEP, REJECT, WorkerConfig, init_worker, process_batch
from gpt_dist.tokenizer import TokenizerError, load_tokenizer
from gpt_dist.utils import atomic_open

STAGES = ("plan", "keys", "bands", "components", "tokenize", "finalize")
PER_TASK = ("keys", "bands", "tokenize")  # the stages run as job arrays
PLAN_FORMAT = "gpt_dist.staged_plan"
OFFSET_BITS = 40  # document id = file index << 40 | end offset: files up to 1 TiB
_MIX = np.uint64(0x9E3779B97F4A7C15)


class StageError(PreprocessError):
    """A one-line failure of one stage task (names the file, task or log)."""


# ---- the work directory ------------------------------------------------------------------

def _marker(work: Path, stage: str, task: int) -> Path:
    return work / stage / f"{task:05d}.done"


def read_marker(work: Path, stage: str, task: int, plan: dict[str, Any]) -> dict[str, Any] | None:
    """The completion marker of ``stage`` task ``task`` for this plan, or None."""
    try:
        m = json.loads(_marker(work, stage, task).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if m.get("plan_key") == plan["plan_key"] else None


def require_task(work: Path, stage: str, task: int, plan: dict[str, Any]) -> dict[str, Any]:
    m = read_marker(work, stage, task, plan)
    if m is None:
        raise StageError(f"{_marker(work, stage, task)}: {stage} task {task} did not complete "
                         f"(see its log, {work / 'logs' / f'{stage}_{task}.out'} under Slurm); rerun it")
    for name, size in m.get("outputs", {}).items():
        path = work / stage / name
        if not path.is_file() or path.stat().st_size != size:
            raise StageError(f"{path}: output of {stage} task {task} is missing or has changed; "
                             f"delete {_marker(work, stage, task)} and rerun that task")
    return m


def finish_task(work: Path, stage: str, task: int, plan: dict[str, Any], outputs: list[str],
            info: dict[str, Any]) -> dict[str, Any]:
    marker = {"plan_key": plan["plan_key"], "stage": stage, "task": task,
              "outputs": {n: (work / stage / n).stat().st_size for n in outputs}, **info}
    indexed.atomic_write_json(_marker(work, stage, task), marker)
    return marker


def load_plan(work: str | Path) -> dict[str, Any]:
    path = Path(work) / "plan.json"
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{path}: no plan; run --stage plan first") from None
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: unreadable plan ({exc})") from None
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise StageError(f"{path}: not a staged preprocessing plan (key: format)")
    return plan


def config_from_plan(plan: dict[str, Any]) -> PreprocessConfig:
    d = dict(plan["config"])
    d["clean"], d["dedup"] = CleanConfig(**d["clean"]), DedupConfig(**d["dedup"])
    return PreprocessConfig(**d)


def _check_task(plan: dict[str, Any], task: int, stage: str) -> None:
    n = plan["tasks"]
    if not 0 <= task < n:
        raise StageError(f"{stage}: task id {task} outside 0..{n - 1} (the plan has {n} tasks)")


# ---- plan -----------------------------------------------------------------------------------

def plan_stage(cfg: PreprocessConfig, work: str | Path, tasks: int) -> dict[str, Any]:
    """Write ``WORK/plan.json`` (idempotent: the same command finds its plan and keeps it)."""
    work = Path(work)
    if tasks < 1:
        raise StageError(f"--tasks {tasks}: must be at least 1")
    if cfg.strict:
        raise StageError("--strict: not available in the staged job (rejects are listed in the rejects file)")
    request = {"inputs": [str(i) for i in cfg.inputs], "tokenizer": str(cfg.tokenizer), "tasks": tasks,
               "output_prefix": str(cfg.output_prefix), "settings": cfg.output_settings()}
    path = work / "plan.json"
    if path.exists():  # written once: later tasks check their own files against it
        old = load_plan(work)
        if old.get("request") != json.loads(json.dumps(request)):
            raise StageError(f"{path}: the work directory holds the plan of another command or task count; "
                             "use another --work-dir (or delete this one)")
        return old
    pre = Preprocessor(cfg)  # resolves the inputs, loads the tokenizer, the single-node config key
    files = pre.files
    if len(files) >= 1 << (64 - OFFSET_BITS):
        raise StageError(f"{files[0].path}: more than {1 << (64 - OFFSET_BITS)} input files")
    units: list[tuple[int, int, int]] = []
    total = sum(f.size for f in files)
    target = max(1, -(-total // tasks))
    for i, f in enumerate(files):
        if f.size >= 1 << OFFSET_BITS:
            raise StageError(f"{f.path}: larger than {1 << OFFSET_BITS} bytes; split it")
        if f.kind != "jsonl" or f.compressed or f.size <= target:
            units.append((i, 0, -1))  # whole file
            continue
        with open(f.path, "rb") as fh:
            start = 0
            while start < f.size:
                fh.seek(min(start + target, f.size))
                fh.readline()  # to the end of the line the cut falls in
                end = min(fh.tell(), f.size)
                units.append((i, start, end))
                start = end
    ranges, done = [], 0
    for fi, start, end in units:
        size = (end - start) if end >= 0 else files[fi].size
        ranges.append({"task": min(tasks - 1, done * tasks // max(total, 1)), "file": fi, "start": start, "end": end})
        done += size
    config = json.loads(json.dumps(asdict(cfg), default=str))  # paths as strings
    config["inputs"] = [f.path for f in files]  # tasks read the plan's files, never a glob again
    plan = {"format": PLAN_FORMAT, "version": 1, "tasks": tasks, "config": config, "config_key": pre.key,
            "plan_key": f"{pre.key}-{tasks}", "bands": pre.bands, "dtype": np.dtype(pre.dtype).name,
            "tokenizer": {"path": str(cfg.tokenizer), "kind": pre.tok.kind, "fingerprint": pre.tok.fingerprint,
                          "vocab_size": pre.tok.vocab_size, "eod_id": pre.tok.eod_id},
            "files": [asdict(f) for f in files], "ranges": ranges, "created": time.time(), "request": request}
    work.mkdir(parents=True, exist_ok=True)
    indexed.atomic_write_json(path, plan)
    return plan


# ---- reading a task's ranges ------------------------------------------------------------------

def _files(plan: dict[str, Any]) -> list[InputFile]:
    return [InputFile(**f) for f in plan["files"]]


def task_ranges(plan: dict[str, Any], task: int) -> list[dict[str, Any]]:
    return [r for r in plan["ranges"] if r["task"] == task]


def _check_inputs(files: list[InputFile], ranges: list[dict[str, Any]], stage: str, task: int) -> None:
    for fi in sorted({r["file"] for r in ranges}):
        f = files[fi]
        try:
            st = os.stat(f.path)
        except FileNotFoundError:
            raise StageError(f"{f.path}: input of {stage} task {task} vanished since the plan") from None
        if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
            raise StageError(f"{f.path}: input of {stage} task {task} changed since the plan (size or mtime)")


def _records(files: list[InputFile], ranges: list[dict[str, Any]], max_bytes: int) -> Iterator[tuple[int, RawRecord]]:
    """(range number, record) of every record of ``ranges`` in input order. A record
    belongs to the range its end offset falls in (ranges end at line ends). A range
    that starts mid-file starts at line 2, so a BOM is only ever dropped on line 1."""
    for k, r in enumerate(ranges):
        fi, start, end = r["file"], r["start"], r["end"]
        for rec in iter_records(files, Position(fi, start, 2 if start else 1), max_bytes):
            if rec.file != fi or (end >= 0 and rec.end.offset > end):
                break
            yield k, rec


def _results(plan: dict[str, Any], cfg: PreprocessConfig, task: int, tokenize: bool
             ) -> Iterator[tuple[int, RawRecord, tuple[Any, ...]]]:
    """(range number, record, worker result) in order, through ``cfg.workers`` processes."""
    files = _files(plan)
    try:
        tok = load_tokenizer(cfg.tokenizer)
    except TokenizerError as exc:
        raise StageError(str(exc)) from None
    if tok.fingerprint != plan["tokenizer"]["fingerprint"]:
        raise StageError(f"{cfg.tokenizer}: tokenizer changed since the plan (fingerprint)")
    wcfg = WorkerConfig(str(cfg.tokenizer), cfg.clean, cfg.dedup, plan["dtype"])

    def batches() -> Iterator[list[tuple[int, RawRecord]]]:
        batch: list[tuple[int, RawRecord]] = []
        size = 0
        for item in _records(files, task_ranges(plan, task), cfg.max_doc_bytes):
            batch.append(item)
            size += len(item[1].data or b"")
            if size >= cfg.batch_bytes or len(batch) >= cfg.batch_docs:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def payload(batch: list[tuple[int, RawRecord]]) -> list[tuple[bytes | None, str | None, str]]:
        return [(r.data, r.error, files[r.file].kind) for _, r in batch]

    if cfg.workers <= 1:  # one CPU (a Slurm task's usual share): a pool would only add copying
        init_worker(wcfg, in_child=False, tok=tok)
        for batch in batches():
            res = process_batch(payload(batch), tokenize=tokenize, hashes=not tokenize)
            for (k, rec), out in zip(batch, res):
                yield k, rec, out
        return
    pool = cf.ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("fork"), initializer=init_worker,
                                  initargs=(wcfg, True, tok))
    pending: deque[tuple[list[tuple[int, RawRecord]], cf.Future[list[tuple[Any, ...]]]]] = deque()
    it = batches()
    try:
        while True:
            while len(pending) < 2 * cfg.workers and (batch := next(it, None)) is not None:
                pending.append((batch, pool.submit(process_batch, payload(batch), tokenize, not tokenize)))
            if not pending:
                return
            batch, fut = pending.popleft()
            for (k, rec), out in zip(batch, fut.result()):
                yield k, rec, out
    except cf.process.BrokenProcessPool:
        raise StageError(f"task {task}: a worker process died (killed or out of memory); rerun the task") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def doc_id(rec: RawRecord) -> int:
    return (rec.file << OFFSET_BITS) | rec.end.offset


def _partition(keys: np.ndarray, parts: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return ((keys * _MIX) >> np.uint64(32)) % np.uint64(parts)


# ---- keys -------------------------------------------------------------------------------------

class _KeyBuffer:
    """A task's (id, exact key, band keys) rows in preallocated uint64 blocks: 8 bytes per
    value, not the ~40-100 bytes of a Python int in a list or of a small array each."""

    def __init__(self, bands: int, block: int = 1 << 15) -> None:
        self.width, self.block = 2 + bands, block
        self.blocks: list[np.ndarray] = []
        self.used = block

    def add(self, doc: int, exact: int | None, bands: np.ndarray | None) -> None:
        if self.used == self.block:
            self.blocks.append(np.zeros((self.block, self.width), np.uint64))
            self.used = 0
        row = self.blocks[-1][self.used]
        row[0] = doc
        row[1] = exact or 0
        if bands is not None:
            row[2:] = bands
        self.used += 1

    def table(self) -> np.ndarray:
        """Rows ``[id, exact key, band keys...]`` of every document added, in order."""
        if not self.blocks:
            return np.zeros((0, self.width), np.uint64)
        self.blocks[-1] = self.blocks[-1][:self.used]
        table = np.concatenate(self.blocks)
        self.blocks = []
        return table


def keys_stage(work: str | Path, task: int) -> dict[str, Any]:
    """Candidate documents' keys, rejects and counters of one task's ranges."""
    work = Path(work)
    plan = load_plan(work)
    _check_task(plan, task, "keys")
    if (done := read_marker(work, "keys", task, plan)) is not None:
        return done
    cfg = config_from_plan(plan)
    ranges = task_ranges(plan, task)
    files = _files(plan)
    _check_inputs(files, ranges, "keys", task)
    (work / "keys").mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    keys = _KeyBuffer(plan["bands"])
    rejects: list[str] = []
    for k, rec, res in _results(plan, cfg, task, tokenize=False):
        counts["records"] += 1
        counts["input_bytes"] += len(rec.data or b"")
        if res[0] == REJECT:
            counts["rejected"] += 1
            counts[f"rejected_{res[1]}"] += 1
            rejects.append(json.dumps({"range": k, "line": rec.line - (1 if ranges[k]["start"] else 0),
                                       "reason": res[1], "message": res[2], "excerpt": res[3]}, ensure_ascii=False))
        elif res[0] == KEEP:
            counts["surrogates_replaced"] += res[5]
            counts["control_chars_removed"] += res[6]
            counts["candidates"] += 1
            keys.add(doc_id(rec), res[2], res[3])
        else:
            counts["surrogates_replaced"] += res[2]
            counts["control_chars_removed"] += res[3]
            counts["filtered"] += 1
            counts[f"filtered_{res[1]}"] += 1
    lines = []
    for r in ranges:  # newlines per range: rejects' line numbers become absolute in finalize
        n = 0
        if r["start"] or r["end"] >= 0:
            with open(files[r["file"]].path, "rb") as fh:
                fh.seek(r["start"])
                left = r["end"] - r["start"]
                while left > 0 and (chunk := fh.read(min(left, 1 << 24))):
                    n += chunk.count(b"\n")
                    left -= len(chunk)
        lines.append(n)
    table = keys.table()
    arrays: dict[str, np.ndarray] = {}
    parts = plan["tasks"]
    names = (["ex"] if cfg.dedup.exact else []) + (["nr"] if cfg.dedup.near and plan["bands"] else [])
    for kind in names:  # one kind at a time: its copies are freed before the next
        if kind == "ex":
            kv, dv = table[:, 1], table[:, 0]
        else:
            kv, dv = table[:, 2:].ravel(), np.repeat(table[:, 0], plan["bands"])
        where = _partition(kv, parts).astype(np.uint32)
        order = np.lexsort((dv, kv, where))  # by partition, then key, then document
        kv, dv, where = kv[order], dv[order], where[order]
        del order
        cuts = np.searchsorted(where, np.arange(parts + 1, dtype=np.uint32))
        for p in range(parts):
            arrays[f"{kind}_k{p}"] = kv[cuts[p]:cuts[p + 1]]
            arrays[f"{kind}_d{p}"] = dv[cuts[p]:cuts[p + 1]]
        del kv, dv, where
    del table
    name = f"{task:05d}.npz"
    with atomic_open(work / "keys" / name, "wb") as f:
        np.savez(f, **arrays)
    rej = f"{task:05d}.rejected.jsonl"
    with atomic_open(work / "keys" / rej, "w") as f:
        f.write("".join(line + "\n" for line in rejects))
    return finish_task(work, "keys", task, plan, [name, rej], {"counts": dict(counts), "lines": lines,
                                                            "key_bytes": int(sum(a.nbytes for a in arrays.values()))})


# ---- bands ------------------------------------------------------------------------------------

def bands_stage(work: str | Path, part: int) -> dict[str, Any]:
    """Key partition ``part`` of every task merged: (key, document) of shared keys only."""
    work = Path(work)
    plan = load_plan(work)
    _check_task(plan, part, "bands")
    if (done := read_marker(work, "bands", part, plan)) is not None:
        return done
    (work / "bands").mkdir(parents=True, exist_ok=True)
    markers = [require_task(work, "keys", t, plan) for t in range(plan["tasks"])]
    out: dict[str, np.ndarray] = {}
    peak = 0
    for name in ("ex", "nr"):
        ks, ds = [], []
        for t in range(len(markers)):
            with np.load(work / "keys" / f"{t:05d}.npz", allow_pickle=False) as z:
                if f"{name}_k{part}" in z.files:
                    ks.append(z[f"{name}_k{part}"])
                    ds.append(z[f"{name}_d{part}"])
        keys = np.concatenate(ks) if ks else np.zeros(0, np.uint64)
        docs = np.concatenate(ds) if ds else np.zeros(0, np.uint64)
        peak = max(peak, keys.nbytes + docs.nbytes)
        order = np.lexsort((docs, keys))
        keys, docs = keys[order], docs[order]
        del order
        if len(keys):  # one (key, document) pair per document: a document may repeat a band key
            first = np.ones(len(keys), bool)
            first[1:] = (keys[1:] != keys[:-1]) | (docs[1:] != docs[:-1])
            keys, docs = keys[first], docs[first]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)
        sizes = np.diff(np.r_[starts, len(keys)])
        shared = np.repeat(sizes >= 2, sizes)  # keys sorted: a group is a run of equal keys
        out[f"{name}_k"], out[f"{name}_d"] = keys[shared], docs[shared]
    name = f"{part:05d}.npz"
    with atomic_open(work / "bands" / name, "wb") as f:
        np.savez(f, **out)
    return finish_task(work, "bands", part, plan, [name], {"pairs": {k: len(v) for k, v in out.items()
                                                                  if k.endswith("_d")}, "peak_key_bytes": peak})


# ---- tokenize ---------------------------------------------------------------------------------

def tokenize_stage(work: str | Path, task: int) -> dict[str, Any]:
    work = Path(work)
    plan = load_plan(work)
    _check_task(plan, task, "tokenize")
    if (done := read_marker(work, "tokenize", task, plan)) is not None:
        return done
    keys = require_task(work, "keys", task, plan)
    require_task(work, "components", 0, plan)
    cfg = config_from_plan(plan)
    _check_inputs(_files(plan), task_ranges(plan, task), "tokenize", task)
    drop = set(np.load(work / "components" / f"drop_{task:05d}.npy", allow_pickle=False).tolist())
    out_dir = work / "tokenize" / f"{task:05d}"
    shutil.rmtree(out_dir, ignore_errors=True)  # a partial earlier try: start over
    out_dir.mkdir(parents=True)
    tok = plan["tokenizer"]
    writer: indexed.ShardWriter | None = None
    shards: list[str] = []
    counts: Counter[str] = Counter()

    def close() -> None:
        nonlocal writer
        assert writer is not None
        writer.finalize()
        writer.commit()
        writer = None

    try:
        for _, rec, res in _results(plan, cfg, task, tokenize=True):
            if res[0] != KEEP:
                continue
            counts["candidates"] += 1
            if doc_id(rec) in drop:
                counts["dropped"] += 1
                continue
            if writer is None:
                shards.append(f"shard_{len(shards):05d}")
                writer = indexed.ShardWriter(str(out_dir / shards[-1]), tok["vocab_size"], tok["eod_id"],
                                             tok["fingerprint"], {"config_key": plan["config_key"]})
            writer.add_document(res[1])
            counts["documents"] += 1
            counts["tokens"] += len(res[1])
            counts["text_bytes"] += res[4]
            if writer.num_tokens >= cfg.shard_tokens:
                close()
        if writer is not None:
            close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if counts["candidates"] != keys["counts"].get("candidates", 0) or counts["dropped"] != len(drop):
        raise StageError(f"tokenize task {task}: its ranges gave {counts['candidates']} documents, the keys stage "
                         f"{keys['counts'].get('candidates', 0)} (an input changed between stages?); rerun from plan")
    names = [f"{task:05d}/{s}{suffix}" for s in shards for suffix in (".bin", ".idx", ".meta.json")]
    return finish_task(work, "tokenize", task, plan, names, {"shards": shards, "counts": dict(counts)})
