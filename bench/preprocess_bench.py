#!/usr/bin/env python
"""Preprocessing throughput: the whole pipeline vs bare sentencepiece encoding, same run.

    python bench/preprocess_bench.py [--workers 2] [--corpus data/sample/corpus.jsonl] [--no-append]

1. The sample corpus (data_tools/sample_corpus.py; generated into the work directory when
   --corpus is not given) and a sentencepiece BPE tokenizer trained on it (--vocab-size).
2. **Pipeline**: gpt_dist.data.preprocess (read, parse, clean, filter, exact + MinHash
   dedup, tokenize, write shards) with N worker processes.
3. **Bare tokenizer** (the floor): the same documents, already parsed in memory, encoded
   by the same tokenizer in a pool of N processes with the same batching (``encode`` of a
   list, one thread per process), each batch's ids returned as one uint16 array.

Both are timed without process start-up, imports and tokenizer loading (the pipeline's
``timing.pipeline_seconds`` from its manifest; the bare pool is warmed up first), best of
--repeats, alternating. The ratio compares MB/s over the same input documents (target
>= 0.8, issue #2); tokens/s are printed for both. Figures and the machine's description
are appended to BENCHMARKS.md unless --no-append.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
from _machine import cpu_name  # bench/ is on sys.path when a bench script runs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SECTION = "## Preprocessing throughput (bench/preprocess_bench.py)"


def machine() -> str:
    cpu = cpu_name()
    ram = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 2**20:.0f} GiB RAM"
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = []
    for pkg in ("torch", "sentencepiece", "megatron-core"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return f"{cpu}, {cores} cores, {ram}, Python {platform.python_version()}, " + ", ".join(versions)


# ---- bare tokenizer pool -----------------------------------------------------------------
_SP = None


def _init(model: str) -> None:
    global _SP
    import sentencepiece as spm

    _SP = spm.SentencePieceProcessor(model_file=model)


def _ping(_: int = 0) -> int:
    return os.getpid()


def _encode(texts: list[str]) -> np.ndarray:
    ids = _SP.encode(texts, num_threads=1)
    return np.concatenate([np.asarray(x, dtype=np.uint16) for x in ids]) if ids else np.zeros(0, np.uint16)


def bare(texts: list[str], model: str, workers: int, batch_docs: int) -> tuple[float, int]:
    """Seconds and tokens of encoding ``texts`` in ``workers`` processes (start-up excluded)."""
    batches = [texts[i:i + batch_docs] for i in range(0, len(texts), batch_docs)]
    with mp.get_context("fork").Pool(workers, initializer=_init, initargs=(model,)) as pool:
        pool.map(_ping, range(workers * 4))
        t0 = time.perf_counter()
        tokens = sum(len(a) for a in pool.imap(_encode, batches))
        return time.perf_counter() - t0, tokens


def pipeline(corpus: Path, tok_dir: Path, out: Path, workers: int) -> dict:
    from gpt_dist.data.preprocess import PreprocessConfig, preprocess

    shutil.rmtree(out, ignore_errors=True)
    return preprocess(PreprocessConfig(inputs=[str(corpus)], tokenizer=str(tok_dir), output_prefix=str(out / "bench"),
                                       workers=workers, progress=False, overwrite=True))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--corpus", help="JSONL corpus (default: generate the sample corpus)")
    ap.add_argument("--max-mb", type=float, default=32.0,
                    help="size of the generated sample corpus (at 4 MB the runs last under a second and "
                         "process start-up dominates both sides)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many alternating runs of each")
    ap.add_argument("--work", help="work directory (default: a temporary one, removed after)")
    ap.add_argument("--no-append", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from gpt_dist.data.sample_corpus import write_sample_corpus
    from gpt_dist.tokenizer import train_tokenizer

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="preprocess_bench."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus = Path(args.corpus) if args.corpus else work / "corpus.jsonl"
        if not corpus.exists():
            write_sample_corpus(corpus, int(args.max_mb * 1e6))
        tok_dir = work / "tokenizer"
        tok = train_tokenizer([corpus], args.vocab_size, tok_dir)
        texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
        text_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        input_mb = corpus.stat().st_size / 1e6
        import megatron.core.datasets.indexed_dataset  # noqa: F401 - import outside any timing

        load_before = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"
        best_pipe, best_bare, manifest = None, None, None
        for _ in range(args.repeats):
            m = pipeline(corpus, tok_dir, work / "out", args.workers)
            if best_pipe is None or m["timing"]["pipeline_seconds"] < best_pipe:
                best_pipe, manifest = m["timing"]["pipeline_seconds"], m
            secs, bare_tokens = bare(texts, str(tok.model_file), args.workers, batch_docs=1024)
            best_bare = secs if best_bare is None else min(best_bare, secs)
        assert manifest is not None and best_pipe is not None and best_bare is not None
        c = manifest["counts"]
        pipe_mbs, bare_mbs = input_mb / best_pipe, text_mb / best_bare
        pipe_tps, bare_tps = c["tokens"] / best_pipe, bare_tokens / best_bare
        ratio = (text_mb / best_pipe) / bare_mbs  # same documents: text MB per second
        desc = machine()
        lines = [
            (f"corpus: {len(texts)} documents, {input_mb:.2f} MB JSONL ({text_mb:.2f} MB of text); vocab {tok.vocab_size}; "
            f"workers {args.workers}; best of {args.repeats}"),
            (f"pipeline: {best_pipe:.2f} s, {pipe_mbs:.2f} MB/s of JSONL ({text_mb / best_pipe:.2f} MB/s of text), "
            f"{pipe_tps:,.0f} tokens/s written ({c['documents']} documents kept, {c['tokens']:,} tokens)"),
            (f"bare sentencepiece: {best_bare:.2f} s, {bare_mbs:.2f} MB/s of text, {bare_tps:,.0f} tokens/s "
            f"({bare_tokens:,} tokens)"),
            (f"ratio pipeline / bare (text MB/s over the same documents): {ratio:.2f} (target >= 0.8: "
            f"{'met' if ratio >= 0.8 else 'NOT met'}); tokens/s ratio {pipe_tps / bare_tps:.2f} (the pipeline "
            f"tokenizes only the {c['documents']} documents that survive filters and dedup)"),
            f"machine: {desc}; load average before the run {load_before}",
        ]
        print("\n".join(lines))
        if not args.no_append:
            path = ROOT / "BENCHMARKS.md"
            text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
            entry = f"\n### {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n" + "".join(f"- {x}\n" for x in lines)
            if SECTION not in text:
                text = text.rstrip("\n") + f"\n\n{SECTION}\n\nRun by `make bench` / `python bench/preprocess_bench.py`" \
                       " (see its docstring for what is timed).\n"
            head, _, tail = text.partition(SECTION)
            nxt = tail.find("\n## ")  # the end of this section: entries go there, others' sections stay
            tail = tail + entry if nxt < 0 else tail[:nxt].rstrip("\n") + "\n" + entry + tail[nxt:]
            path.write_text(head + SECTION + tail, encoding="utf-8")
            print(f"appended to {path}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
