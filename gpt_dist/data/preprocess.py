"""Preprocessing: inputs -> clean -> filter -> dedup -> tokenize -> sharded indexed datasets.

Design (see docs/data.md):

* **Deterministic.** The parent reads inputs in order and cuts them into batches;
  workers parse, clean, filter, hash and tokenize a batch and return results in order;
  the parent deduplicates and writes documents in input order. Shard boundaries depend
  only on the token count, so ``--workers 1`` and ``--workers 8`` give identical bytes.
* **Bounded memory.** Inputs are streamed; at most ``workers * partitions * 2`` batches
  are in flight; a shard's index lives in memory only while it is written; the dedup
  keys cost about 80 bytes per kept document.
* **Safe and resumable.** Every shard is written to ``.tmp`` names and renamed when
  complete (``gpt_dist.data.indexed``). After each shard the resume state (input
  position, counters, dedup keys of that shard's documents, rejects-file length) is
  saved under ``PREFIX.resume/``; re-running the same command continues after the last
  complete shard and produces the same shards as an uninterrupted run.
* **Bad input is counted, not fatal** (unless ``strict``): malformed lines are listed
  with file, line and reason in ``PREFIX.rejected.jsonl``.
"""

from __future__ import annotations

import concurrent.futures as cf
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpt_dist.data import indexed
from gpt_dist.data.clean import FILTERS, CleanConfig
from gpt_dist.data.dedup import DedupConfig, Deduplicator, optimal_bands
from gpt_dist.data.readers import (
    Position,
    RawRecord,
    iter_records,
    resolve_inputs,
)
from gpt_dist.data.worker import (
    KEEP,
    REJECT,
    WorkerConfig,
    init_worker,
    ping,
    process_batch,
)
from gpt_dist.tokenizer import TokenizerError, load_tokenizer
from gpt_dist.utils import atomic_open

MANIFEST_FORMAT = "gpt_dist.preprocess"


def manifest_counts(c: Counter[str] | dict[str, int]) -> dict[str, Any]:
    """The manifest's ``counts`` section from the run's counters (the single-node command and
    the staged job's finalize write the same)."""
    return {"records": c["records"], "documents": c["documents"], "tokens": c["tokens"],
            "input_bytes": c["input_bytes"], "text_bytes": c["text_bytes"],
            "rejected": {k[len("rejected_"):]: v for k, v in sorted(c.items()) if k.startswith("rejected_")},
            "filtered": {name: c[f"filtered_{name}"] for name in FILTERS},
            "duplicates": {"exact": c["duplicate_exact"], "near": c["duplicate_near"]},
            "surrogates_replaced": c["surrogates_replaced"],
            "control_chars_removed": c["control_chars_removed"]}


class PreprocessError(Exception):
    """A one-line, user-facing failure (``path: reason``)."""


@dataclass
class PreprocessConfig:
    inputs: list[str]
    tokenizer: str
    output_prefix: str
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    partitions: int = 1  # Megatron-compatible flag: only scales how many batches are in flight
    shard_tokens: int = 50_000_000
    max_doc_bytes: int = 1_000_000
    strict: bool = False
    overwrite: bool = False
    progress: bool | None = None  # None: only on a terminal
    batch_bytes: int = 1 << 20
    batch_docs: int = 1024
    clean: CleanConfig = field(default_factory=CleanConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)

    def output_settings(self) -> dict[str, Any]:
        """Everything that changes the output bytes (not workers, progress, batching)."""
        return {"shard_tokens": self.shard_tokens, "max_doc_bytes": self.max_doc_bytes,
                "clean": self.clean.to_dict(), "dedup": self.dedup.to_dict()}


def _counters() -> Counter[str]:
    return Counter()


@dataclass
class _Resume:
    shard: int = 0
    position: Position = field(default_factory=Position)
    counts: Counter[str] = field(default_factory=_counters)
    rejects_bytes: int = 0
    keys: list[np.ndarray] = field(default_factory=list)
    done: bool = False


class Preprocessor:
    """One run of the pipeline; :func:`preprocess` is the entry point."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg
        self.prefix = str(cfg.output_prefix)
        self.files = resolve_inputs(cfg.inputs)
        try:
            self.tok = load_tokenizer(cfg.tokenizer)
        except TokenizerError as exc:
            raise PreprocessError(str(exc)) from None
        self.dtype = indexed.token_dtype(self.tok.vocab_size)
        self.bands = optimal_bands(cfg.dedup.threshold, cfg.dedup.num_perm)[0] if cfg.dedup.near else 0
        self.key = self._config_key()
        self.out_dir = Path(self.prefix).parent
        self.resume_dir = Path(self.prefix + ".resume")
        self.rejects_path = Path(self.prefix + ".rejected.jsonl")
        self.manifest_path = Path(self.prefix + ".manifest.json")

    def _config_key(self) -> str:
        payload = {"tokenizer": self.tok.fingerprint, "settings": self.cfg.output_settings(),
                   "inputs": [(f.path, f.size, f.mtime_ns) for f in self.files]}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    # ---- set-up: output directory, lock, resume plan ---------------------------------
    def _prepare_output(self) -> None:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            probe = self.out_dir / f".preprocess-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise PreprocessError(f"{self.out_dir}: output directory not writable ({exc.strerror or exc})") from None
        self._lock = open(self.prefix + ".lock", "w")  # noqa: SIM115 - held for the whole run (lock)
        try:
            # a POSIX record lock, not flock(): flock belongs to the open file, which the forked
            # workers share, so after a SIGKILL of the parent the dying (or orphaned) workers
            # kept the prefix locked and an immediate re-run was refused; lockf's lock belongs
            # to this process alone and goes with it
            fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise PreprocessError(f"{self.prefix}: another preprocess run is writing this prefix") from None

    def _existing_shards(self) -> list[int]:
        found = set()
        for path in self.out_dir.glob(Path(self.prefix).name + "_*"):
            stem = path.name[len(Path(self.prefix).name) + 1:].split(".")[0]
            if stem.isdigit() and len(stem) >= 5:
                found.add(int(stem))
        return sorted(found)

    def _remove_from(self, first: int) -> None:
        for k in self._existing_shards():
            if k >= first:
                indexed.remove_shard_files(indexed.shard_prefix(self.prefix, k))
        for k in range(first, first + 10_000):
            stem = self.resume_dir / f"{k:05d}"
            if not Path(f"{stem}.json").exists() and not Path(f"{stem}.npy").exists():
                break
            for suffix in (".json", ".npy"):
                Path(f"{stem}{suffix}").unlink(missing_ok=True)

    def _plan(self) -> _Resume:
        """Where to start: after the last complete shard of a previous run of the same
        command; nothing to do if its manifest says it finished."""
        existing = self._existing_shards()
        if self.cfg.overwrite:
            self._remove_from(0)
            shutil.rmtree(self.resume_dir, ignore_errors=True)
            self.manifest_path.unlink(missing_ok=True)
            return _Resume()
        if self.manifest_path.exists():
            try:
                manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                manifest = {}
            if manifest.get("config_key") != self.key:
                raise PreprocessError(f"{self.manifest_path}: the prefix holds the output of a different "
                                      "command (inputs, tokenizer or settings); use --overwrite")
            try:
                for s in indexed.list_shards(self.prefix):
                    indexed.validate_shard(s, require_sidecar=True)
                return _Resume(done=True)
            except indexed.ShardFormatError:
                pass  # a shard was lost or damaged after completion: redo from the resume state
            self.manifest_path.unlink()
        state = _Resume()
        for k in range(len(existing) + 1):
            sp = indexed.shard_prefix(self.prefix, k)
            info = self.resume_dir / f"{k:05d}.json"
            try:
                meta = indexed.validate_shard(sp, require_sidecar=True)["sidecar"]
                saved = json.loads(info.read_text(encoding="utf-8"))
                keys = np.load(self.resume_dir / f"{k:05d}.npy", allow_pickle=False)
            except (indexed.ShardFormatError, OSError, ValueError):
                break
            if meta.get("config_key") != self.key or saved.get("config_key") != self.key:
                if k == 0 and meta.get("config_key") != self.key:
                    raise PreprocessError(f"{sp}.idx: the prefix holds shards of a different command "
                                          "(inputs, tokenizer or settings); use --overwrite")
                break
            state.shard = k + 1
            state.position = Position(**saved["position"])
            state.counts = Counter(saved["counts"])
            state.rejects_bytes = int(saved["rejects_bytes"])
            state.keys.append(keys)
        if state.shard == 0 and existing and not (self.resume_dir.exists() or self._ours(existing[0])):
            raise PreprocessError(f"{indexed.shard_prefix(self.prefix, existing[0])}: files of another "
                                  "run are at this prefix; use --overwrite or another --output-prefix")
        self._remove_from(state.shard)
        return state

    def _ours(self, k: int) -> bool:
        try:
            meta = indexed.read_sidecar(indexed.shard_prefix(self.prefix, k)) or {}
        except indexed.ShardFormatError:
            return False
        if meta:
            return meta.get("config_key") == self.key
        return not Path(indexed.shard_prefix(self.prefix, k) + ".idx").exists()  # only .tmp leftovers

    # ---- the run ---------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self._prepare_output()
        state = self._plan()
        if state.done:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            manifest["already_complete"] = True
            return manifest
        self.counts: Counter[str] = state.counts
        self.dedup = Deduplicator(self.cfg.dedup, self.bands)
        for keys in state.keys:
            self.dedup.restore(keys)
        self.shard_index = state.shard
        self.resumed_from = state.shard
        self.pending_commits: list[indexed.ShardWriter] = []
        self.writer: indexed.ShardWriter | None = None
        self.shard_keys: list[np.ndarray] = []
        with open(self.rejects_path, "ab") as f:
            f.truncate(state.rejects_bytes)
        self.rejects = open(self.rejects_path, "ab")  # noqa: SIM115 - closed in finally
        t0 = time.time()
        try:
            with _signals_as_interrupt():
                self._stream(state.position)
            if self.writer is not None:
                self._close_shard(self._last_end)
            if self.cfg.strict:
                for w in self.pending_commits:
                    w.commit()
                self.pending_commits = []
        except BaseException:
            if self.writer is not None:
                self.writer.abort()
            for w in self.pending_commits:
                w.abort()
            raise
        finally:
            self.rejects.close()
        if self.counts["documents"] == 0:
            raise PreprocessError(f"{self.files[0].path}: no document survived (rejected "
                                  f"{self.counts['rejected']}, filtered {self.counts['filtered']}, "
                                  f"duplicates {self.counts['duplicates']}); see {self.rejects_path}")
        manifest = self._manifest(time.time() - t0, time.time() - self.t_started)
        indexed.atomic_write_json(self.manifest_path, manifest)
        shutil.rmtree(self.resume_dir, ignore_errors=True)
        Path(self.prefix + ".lock").unlink(missing_ok=True)
        return manifest

    def _batches(self, start: Position) -> Iterator[list[RawRecord]]:
        batch: list[RawRecord] = []
        size = 0
        for rec in iter_records(self.files, start, self.cfg.max_doc_bytes):
            batch.append(rec)
            size += len(rec.data or b"")
            if size >= self.cfg.batch_bytes or len(batch) >= self.cfg.batch_docs:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def _stream(self, start: Position) -> None:
        self._last_end = start
        self.t_started = time.time()
        wcfg = WorkerConfig(str(self.cfg.tokenizer), self.cfg.clean, self.cfg.dedup, np.dtype(self.dtype).name)
        progress = _Progress(sum(f.size for f in self.files), self.cfg.progress)
        batches = self._batches(start)
        try:
            if self.cfg.workers <= 0:  # in-process: for debugging and profiling
                init_worker(wcfg, in_child=False, tok=self.tok)
                for batch in batches:
                    self._consume(batch, process_batch(self._payload(batch)), progress)
                return
            self._stream_pool(wcfg, batches, progress)
        finally:
            progress.close()

    def _payload(self, batch: list[RawRecord]) -> list[tuple[bytes | None, str | None, str]]:
        return [(r.data, r.error, self.files[r.file].kind) for r in batch]

    def _stream_pool(self, wcfg: WorkerConfig, batches: Iterator[list[RawRecord]], progress: _Progress) -> None:
        method = os.environ.get("GPT_DIST_PREPROCESS_START", "fork" if sys.platform == "linux" else "spawn")
        pool = cf.ProcessPoolExecutor(self.cfg.workers, mp_context=mp.get_context(method),
                                      initializer=init_worker,  # fork: the children inherit the tokenizer
                                      initargs=(wcfg, True, self.tok if method == "fork" else None))
        max_inflight = 2 * self.cfg.workers * max(1, self.cfg.partitions)
        pending: deque[tuple[list[RawRecord], cf.Future[list[tuple[Any, ...]]]]] = deque()
        try:
            for f in [pool.submit(ping) for _ in range(self.cfg.workers)]:
                f.result()
            progress.start()
            self.t_started = progress.t0  # excludes worker start-up (fork + tokenizer load)
            exhausted = False
            while True:
                while not exhausted and len(pending) < max_inflight:
                    batch = next(batches, None)
                    if batch is None:
                        exhausted = True
                        break
                    pending.append((batch, pool.submit(process_batch, self._payload(batch))))
                if not pending:
                    break
                batch, fut = pending.popleft()
                self._consume(batch, fut.result(), progress)
        except cf.process.BrokenProcessPool:
            raise PreprocessError(f"{self.prefix}: a worker process died (killed or out of memory); "
                                  "completed shards are kept: re-run the same command to resume") from None
        finally:
            for _, fut in pending:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def _consume(self, batch: list[RawRecord], results: list[tuple[Any, ...]], progress: _Progress) -> None:
        counts = self.counts
        if self.cfg.strict:  # fail on a batch's first bad record before writing any of it
            for rec, res in zip(batch, results):
                if res[0] == REJECT:
                    self._reject(rec, res[1], res[2], res[3])
        for rec, res in zip(batch, results):
            counts["records"] += 1
            counts["input_bytes"] += len(rec.data or b"")
            if res[0] == REJECT:
                self._reject(rec, res[1], res[2], res[3])
            elif res[0] == KEEP:
                _, tokens, exact, bands, nbytes, surrogates, controls = res
                counts["surrogates_replaced"] += surrogates
                counts["control_chars_removed"] += controls
                dup = self.dedup.check(exact, bands)
                if dup is not None:
                    counts["duplicates"] += 1
                    counts[f"duplicate_{dup}"] += 1
                else:
                    self._write(tokens, self.dedup.row(exact, bands), nbytes)
            else:
                counts["surrogates_replaced"] += res[2]
                counts["control_chars_removed"] += res[3]
                counts["filtered"] += 1
                counts[f"filtered_{res[1]}"] += 1
            self._last_end = rec.end
            if self.writer is not None and self.writer.num_tokens >= self.cfg.shard_tokens:
                self._close_shard(rec.end)
        progress.update(sum(len(r.data or b"") for r in batch), len(batch), counts)

    def _reject(self, rec: RawRecord, code: str, message: str, excerpt: str) -> None:
        path = self.files[rec.file].path
        if self.cfg.strict:
            raise PreprocessError(f"{path}:{rec.line}: {message} (strict mode; without --strict "
                                  "bad lines are skipped and listed in the rejects file)")
        self.counts["rejected"] += 1
        self.counts[f"rejected_{code}"] += 1
        line = {"file": path, "line": rec.line, "reason": code, "message": message, "excerpt": excerpt}
        self.rejects.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))

    def _write(self, tokens: np.ndarray, key_row: np.ndarray, nbytes: int) -> None:
        if self.writer is None:
            extra = {"config_key": self.key, "shard_index": self.shard_index}
            self.writer = indexed.ShardWriter(indexed.shard_prefix(self.prefix, self.shard_index),
                                              self.tok.vocab_size, self.tok.eod_id, self.tok.fingerprint, extra)
        self.writer.add_document(tokens)
        self.shard_keys.append(key_row)
        self.counts["documents"] += 1
        self.counts["tokens"] += len(tokens)
        self.counts["text_bytes"] += nbytes

    def _close_shard(self, end: Position) -> None:
        """Finalize the current shard; save the resume state; commit (strict: later)."""
        writer, self.writer = self.writer, None
        assert writer is not None
        writer.finalize()
        if self.cfg.strict:
            self.pending_commits.append(writer)
        else:
            self.rejects.flush()
            os.fsync(self.rejects.fileno())
            self.resume_dir.mkdir(exist_ok=True)
            stem = self.resume_dir / f"{self.shard_index:05d}"
            keys = np.stack(self.shard_keys) if self.shard_keys else np.zeros((0, 1 + self.bands), np.uint64)
            with atomic_open(f"{stem}.npy", "wb") as f:
                np.save(f, keys, allow_pickle=False)
            indexed.atomic_write_json(f"{stem}.json", {
                "config_key": self.key, "position": asdict(end), "counts": dict(self.counts),
                "rejects_bytes": self.rejects.tell()})
            writer.commit()
        self.shard_keys = []
        self.shard_index += 1

    def _manifest(self, seconds: float, pipeline_seconds: float) -> dict[str, Any]:
        shards = []
        for k in range(self.shard_index):
            sp = indexed.shard_prefix(self.prefix, k)
            meta = indexed.read_sidecar(sp) or {}
            shards.append({"prefix": os.path.basename(sp), **{key: meta.get(key) for key in (
                "num_documents", "num_tokens", "bin_bytes", "bin_sha256", "idx_bytes", "idx_sha256",
                "max_token_id")}})
        c = self.counts
        new_bytes = c["input_bytes"]
        seconds = pipeline_seconds  # rates exclude worker start-up and interpreter imports
        return {
            "format": MANIFEST_FORMAT, "version": 1, "config_key": self.key,
            "output_prefix": os.path.basename(self.prefix), "dtype": np.dtype(self.dtype).name,
            "shards": shards,
            "inputs": [{"path": f.path, "size": f.size, "sha256": indexed.sha256_file(f.path)} for f in self.files],
            "tokenizer": {"path": str(self.cfg.tokenizer), "kind": self.tok.kind,
                          "fingerprint": self.tok.fingerprint, "vocab_size": self.tok.vocab_size,
                          "eod_id": self.tok.eod_id},
            "settings": self.cfg.output_settings(),
            "counts": manifest_counts(c),
            "dedup_memory_bytes": self.dedup.nbytes(),
            "timing": {"seconds": round(seconds, 3), "pipeline_seconds": round(pipeline_seconds, 3),
                       "workers": self.cfg.workers,
                       "resumed_from_shard": self.resumed_from,
                       "mb_per_s": round(new_bytes / 1e6 / max(seconds, 1e-9), 3),
                       "docs_per_s": round(c["records"] / max(seconds, 1e-9), 1),
                       "tokens_per_s": round(c["tokens"] / max(seconds, 1e-9), 1)},
        }


class _Progress:
    """tqdm bar over input bytes with documents/s, MB/s and tokens/s (on a terminal, or when
    asked). tqdm is not even imported otherwise: its import costs ~0.1 s of a run's start."""

    def __init__(self, total: int, enabled: bool | None) -> None:
        self.total, self.bar, self.started = total, None, False
        self.show = sys.stderr.isatty() if enabled is None else enabled  # tqdm's own disable=None rule
        self.t0 = time.time()

    def start(self) -> None:
        self.t0, self.started = time.time(), True
        if self.show:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="B", unit_scale=True, desc="preprocess", smoothing=0.1,
                            dynamic_ncols=True)

    def update(self, nbytes: int, ndocs: int, counts: Counter[str]) -> None:
        if not self.started:
            self.start()
        if self.bar is None:
            return
        self.bar.update(nbytes)
        dt = max(time.time() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{counts['records'] / dt:,.0f} docs/s {counts['tokens'] / dt:,.0f} tok/s",
                                 refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _signals_as_interrupt:
    """SIGTERM behaves like Ctrl-C, so temporary files are removed either way."""

    def __enter__(self) -> None:
        self._old = signal.signal(signal.SIGTERM, self._handler)

    @staticmethod
    def _handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._old)


def preprocess(cfg: PreprocessConfig) -> dict[str, Any]:
    """Run (or resume) preprocessing; returns the manifest. Raises PreprocessError,
    InputError (gpt_dist.data.readers) or OSError with a path for one-line reporting."""
    if cfg.workers < 0 or cfg.shard_tokens <= 0 or cfg.max_doc_bytes <= 0:
        raise PreprocessError("--workers, --shard-tokens and --max-doc-bytes must be positive")
    return Preprocessor(cfg).run()


def summary_table(manifest: dict[str, Any]) -> str:
    """The final report printed by the CLI."""
    c, t = manifest["counts"], manifest["timing"]
    rows = [("records read", c["records"]), ("documents written", c["documents"]), ("tokens", c["tokens"]),
            ("shards", len(manifest["shards"])), ("input MB", f"{c['input_bytes'] / 1e6:.2f}")]
    rows += [(f"rejected: {k}", v) for k, v in c["rejected"].items()]
    rows += [(f"filtered: {k}", v) for k, v in c["filtered"].items()]
    rows += [("duplicates: exact", c["duplicates"]["exact"]), ("duplicates: near", c["duplicates"]["near"]),
             ("surrogates replaced", c["surrogates_replaced"]), ("control chars removed", c["control_chars_removed"]),
             ("seconds", t["seconds"]), ("docs/s", t["docs_per_s"]), ("MB/s", t["mb_per_s"]),
             ("tokens/s", t["tokens_per_s"]), ("dedup memory MB", f"{manifest['dedup_memory_bytes'] / 1e6:.2f}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v:>14}" if isinstance(v, int) else f"  {k:<{width}}  {v!s:>14}"
                     for k, v in rows)
