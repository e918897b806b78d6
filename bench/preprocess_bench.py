#!/usr/bin/env python
"""Preprocessing: the whole ``data_tools/preprocess.py`` command vs bare sentencepiece vs
Megatron-LM's ``tools/preprocess_data.py``, and with GPT-2's BPE vs bare tiktoken, side by
side in one run.

    python bench/preprocess_bench.py [--workers 2] [--corpus FILE.jsonl | --max-mb 11]
        [--megatron-lm PATH [--megatron-lm-pythonpath DIRS]] [--repeats 3] [--no-append]
        [--cases sentencepiece,gpt2_bpe] [--gpt2-bpe DIR | --gpt2-merges 50000]

1. The corpus (``--corpus``, or the sample corpus of ``--max-mb`` MB that
   data_tools/sample_corpus.py builds from the installed packages' documentation) and a
   sentencepiece BPE tokenizer trained on it (``--vocab-size``); neither is timed.
2. Three commands, each a fresh process timed from start to exit (imports, worker
   start-up and tokenizer loading included), run in turn --repeats times:

   * **gpt_dist**: ``data_tools/preprocess.py`` with ``--workers N`` (read, parse,
     clean, filter, exact + MinHash dedup, tokenize, write and hash the shards).
   * **bare sentencepiece**: ``bench/_bare_tokenize.py``, the same texts JSON-decoded in
     the parent and encoded by the same tokenizer in a pool of N processes with the
     pipeline's batching; nothing cleaned, filtered or written. The floor.
   * **Megatron-LM** (when ``--megatron-lm`` names a checkout of NVIDIA/Megatron-LM, e.g.
     the core_v0.16.1 tag): ``tools/preprocess_data.py --tokenizer-type
     SentencePieceTokenizer --tokenizer-model ... --workers N``, run from the checkout.
     Without ``--append-eod``: its SentencePiece wrapper takes the model's ``eos`` as
     end-of-document, which this tokenizer does not define (gpt_dist appends its own
     ``<|endoftext|>``), so Megatron-LM writes one token per document less.
     ``--megatron-lm-pythonpath`` adds directories holding what its imports need beyond
     this environment (``six``, and ``triton`` through ``megatron.training``).

   Besides the wall times, the steady-state rates (start-up excluded) of the first two:
   the pipeline's ``timing.pipeline_seconds`` from its manifest, the bare pool's time
   from first batch to last result.
3. The GPT-2 BPE case (issue 21), with ``--gpt2-bpe DIR`` (GPT-2's own ``encoder.json`` +
   ``vocab.bpe``) or else a byte-level BPE of GPT-2's shape (256 bytes, ``--gpt2-merges``
   merges, ``<|endoftext|>`` last: 50,257 tokens) trained on the corpus by ``tokenizers``
   and written in GPT-2's layout (not timed). Two more commands in the same rotation:

   * **gpt_dist GPT-2 BPE**: ``data_tools/preprocess.py --tokenizer DIR``, everything as above.
   * **bare tiktoken**: ``bench/_bare_tokenize.py`` with the same files, loaded as tiktoken
     loads its own ``gpt2`` encoding, ``encode_ordinary`` in a pool of N processes.

Targets (issue 11): the whole gpt_dist command >= 2x faster than Megatron-LM's, and >= 0.9
of the bare tokenizer's throughput (input MB/s over the same documents; reported for the
whole commands and for the steady state). Issue 21: with GPT-2's BPE, >= 0.5 of bare
tiktoken's throughput over the whole command. Best of --repeats for each; every run's figure
is printed too. Figures and the machine are added to BENCHMARKS.md unless --no-append.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from _machine import cpu_name  # bench/ is on sys.path when a bench script runs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SECTION = "## Preprocessing throughput (bench/preprocess_bench.py)"
EARLIER = "\n### Earlier runs"


def machine() -> str:
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
    for pkg in ("sentencepiece", "tiktoken", "tokenizers", "numpy", "megatron-core"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return f"{cpu_name()} ({cores} cores), {ram}, Python {platform.python_version()}, " + ", ".join(versions)


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"


CPU: dict[int, float] = {}  # id(CompletedProcess) -> CPU seconds of the command and its workers


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall seconds of one command, start-up to exit; its CPU seconds (user + system, worker
    processes included) go to :data:`CPU`: on a loaded machine they move less than wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU[id(proc)] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, proc


def _failed(name: str, proc: subprocess.CompletedProcess[str]) -> RuntimeError:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return RuntimeError(f"{name} exited {proc.returncode}: {' | '.join(tail)}")


def megatron_lm_version(path: Path) -> str:
    info = path / "megatron" / "core" / "package_info.py"
    scope: dict[str, object] = {}
    try:
        exec(compile(info.read_text(), str(info), "exec"), scope)  # noqa: S102 - a version file of a checkout
        return str(scope.get("__version__", "?"))
    except (OSError, SyntaxError):
        return "?"


class Contenders:
    """The three commands on one corpus; each ``run_*`` returns (wall seconds, extra)."""

    def __init__(self, args: argparse.Namespace, corpus: Path, tok_dir: Path, work: Path) -> None:
        from gpt_dist.data.preprocess import PreprocessConfig

        self.args, self.corpus, self.tok_dir, self.work = args, corpus, tok_dir, work
        defaults = PreprocessConfig(inputs=[], tokenizer="", output_prefix="")
        self.batch = (defaults.batch_bytes, defaults.batch_docs)
        self.env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def ours(self, tok_dir: Path | None = None, name: str = "ours") -> tuple[float, dict]:
        out = self.work / name
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, str(ROOT / "data_tools" / "preprocess.py"), "--input", str(self.corpus),
               "--tokenizer", str(tok_dir or self.tok_dir), "--output-prefix", str(out / "bench"),
               "--workers", str(self.args.workers), "--no-progress"]
        wall, proc = timed(cmd, ROOT, self.env)
        if proc.returncode != 0:
            raise _failed("data_tools/preprocess.py", proc)
        return wall, {**json.loads((out / "bench.manifest.json").read_text()), "cpu": CPU.pop(id(proc))}

    def bare(self, tokenizer: Path | None = None) -> tuple[float, dict]:
        """Bare sentencepiece (``tokenizer.model``), or bare tiktoken (a GPT-2 directory)."""
        cmd = [sys.executable, str(ROOT / "bench" / "_bare_tokenize.py"), str(self.corpus),
               str(tokenizer or self.tok_dir / "tokenizer.model"), str(self.args.workers), *map(str, self.batch)]
        wall, proc = timed(cmd, ROOT, self.env)
        if proc.returncode != 0:
            raise _failed("bench/_bare_tokenize.py", proc)
        return wall, {**json.loads(proc.stdout.strip().splitlines()[-1]), "cpu": CPU.pop(id(proc))}

    def megatron_lm(self) -> tuple[float, dict]:
        path = Path(self.args.megatron_lm)
        out = self.work / "megatron_lm"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        env = dict(self.env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self.args.megatron_lm_pythonpath, os.environ.get("PYTHONPATH"))
                                            if p)
        cmd = [sys.executable, str(path / "tools" / "preprocess_data.py"), "--input", str(self.corpus),
               "--output-prefix", str(out / "bench"), "--tokenizer-type", "SentencePieceTokenizer",
               "--tokenizer-model", str(self.tok_dir / "tokenizer.model"), "--workers", str(self.args.workers)]
        wall, proc = timed(cmd, path, env)
        idx = out / "bench_text_document.idx"
        if proc.returncode != 0 or not idx.exists():
            raise _failed("Megatron-LM tools/preprocess_data.py", proc)
        with open(idx, "rb") as f:
            head = f.read(34)
        return wall, {"documents": int.from_bytes(head[18:26], "little"), "cpu": CPU.pop(id(proc))}


def summarize(args: argparse.Namespace, corpus: Path, vocab: int, runs: dict[str, list[tuple[float, dict]]],
              load_before: str, mlm_note: str, gpt2_note: str) -> list[str]:
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    text_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    input_mb = corpus.stat().st_size / 1e6

    def best(name: str) -> tuple[float, dict]:
        return min(runs[name], key=lambda r: r[0])

    def all_walls(name: str) -> str:
        return ", ".join(f"{w:.2f}" for w, _ in runs[name])

    def cpu(name: str) -> float:
        return min(r["cpu"] for _, r in runs[name])

    def ok(x: float, target: float) -> str:
        return "met" if x >= target else "NOT met"

    def pair(ours: str, bare: str, what: str, bare_name: str, target: float) -> list[str]:
        ours_wall, manifest = best(ours)
        bare_wall, res = best(bare)
        steady = min(m["timing"]["pipeline_seconds"] for _, m in runs[ours])
        bare_steady = min(b["encode_seconds"] for _, b in runs[bare])
        c = manifest["counts"]
        whole, steady_ratio = bare_wall / ours_wall, bare_steady / steady
        return [
            (f"gpt_dist `data_tools/preprocess.py`{what} (whole command): {ours_wall:.2f} s = "
             f"{input_mb / ours_wall:.2f} MB/s (runs: {all_walls(ours)}); steady state {steady:.2f} s = "
             f"{input_mb / steady:.2f} MB/s; CPU {cpu(ours):.2f} s; {c['documents']} documents kept, "
             f"{c['tokens']:,} tokens"),
            (f"bare {bare_name} `bench/_bare_tokenize.py` (whole command): {bare_wall:.2f} s = "
             f"{input_mb / bare_wall:.2f} MB/s (runs: {all_walls(bare)}); encoding alone {bare_steady:.2f} s = "
             f"{input_mb / bare_steady:.2f} MB/s; CPU {cpu(bare):.2f} s; {res['documents']} documents, "
             f"{res['tokens']:,} tokens"),
            (f"gpt_dist{what} / bare {bare_name} throughput over the same input: whole command **{whole:.2f}**, "
             f"steady state **{steady_ratio:.2f}** (target >= {target}: {ok(whole, target)}, "
             f"{ok(steady_ratio, target)}); CPU seconds bare / gpt_dist {cpu(bare) / cpu(ours):.2f}"),
        ]

    lines = [(f"corpus: {len(texts)} documents, {input_mb:.2f} MB JSONL ({text_mb:.2f} MB of text); "
             f"workers {args.workers}; best of {args.repeats} runs of each, in turn")]
    if "ours" in runs:
        lines.append(f"**sentencepiece BPE**, vocab {vocab}:")
        lines += pair("ours", "bare", "", "sentencepiece", 0.9)

    if runs.get("megatron_lm"):
        mlm_wall, mlm = best("megatron_lm")
        speedup = mlm_wall / best("ours")[0]
        lines.append(f"Megatron-LM `tools/preprocess_data.py` ({mlm_note}): {mlm_wall:.2f} s = "
                     f"{input_mb / mlm_wall:.2f} MB/s (runs: {all_walls('megatron_lm')}); CPU {cpu('megatron_lm'):.2f} s; "
                     f"{mlm['documents']} documents")
        lines.append(f"gpt_dist vs Megatron-LM, whole command: **{speedup:.2f}x** faster (target >= 2: "
                     f"{ok(speedup, 2.0)})")
    elif "ours" in runs:
        lines.append(f"Megatron-LM: not run ({mlm_note})")
    if "ours_gpt2" in runs:
        lines.append(f"**GPT-2 BPE** ({gpt2_note}):")
        lines += pair("ours_gpt2", "bare_gpt2", " GPT-2 BPE", "tiktoken", 0.5)
    lines.append(f"machine: {machine()}; load average {load_before} before the runs, {load()} after")
    return lines


def append(lines: list[str]) -> Path:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    entry = f"\n### {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n" + "".join(f"- {x}\n" for x in lines)
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\nRun by `make bench` / `python bench/preprocess_bench.py`" \
               " (see its docstring for what is timed).\n"
    head, _, tail = text.partition(SECTION)
    # entries go at the end of this section, before its "Earlier runs" (an older bench's)
    nxt = min((i for i in (tail.find(EARLIER), tail.find("\n## ")) if i >= 0), default=-1)
    tail = tail + entry if nxt < 0 else tail[:nxt].rstrip("\n") + "\n" + entry + tail[nxt:]
    path.write_text(head + SECTION + tail, encoding="utf-8")
    return path


def train_gpt2_bpe(corpus: Path, out: Path, merges: int) -> None:
    """A byte-level BPE of GPT-2's shape trained on ``corpus``, written in GPT-2's layout:
    byte ids in GPT-2's order, merge ``i`` is id ``256 + i``, ``<|endoftext|>`` last (so
    tiktoken's own GPT-2 loader accepts it, as it accepts GPT-2's released files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from gpt_dist.tokenizer_tiktoken import bytes_to_unicode

    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    eng = Tokenizer(models.BPE())
    eng.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    eng.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=256 + merges, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    pairs = [m.split(" ") if isinstance(m, str) else m for m in json.loads(eng.to_str())["model"]["merges"]]
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for a, b in pairs:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in pairs), encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--corpus", help="JSONL corpus (default: generate the sample corpus)")
    ap.add_argument("--max-mb", type=float, default=11.0, help="size of the generated sample corpus")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each command, in turn; the best counts")
    ap.add_argument("--megatron-lm", help="a checkout of NVIDIA/Megatron-LM (core_v0.16.1) to run its "
                                          "tools/preprocess_data.py too")
    ap.add_argument("--megatron-lm-pythonpath", default="",
                    help="extra PYTHONPATH for Megatron-LM's command (directories with six, triton)")
    ap.add_argument("--cases", default="sentencepiece,gpt2_bpe",
                    help="comma-separated: sentencepiece (with Megatron-LM), gpt2_bpe")
    ap.add_argument("--gpt2-bpe", help="a directory with GPT-2's encoder.json + vocab.bpe (default: train "
                                       "one of GPT-2's shape on the corpus)")
    ap.add_argument("--gpt2-merges", type=int, default=50_000, help="merges of the trained GPT-2-shaped BPE")
    ap.add_argument("--work", help="work directory (default: a temporary one, removed after)")
    ap.add_argument("--no-append", action="store_true", help="do not add the figures to BENCHMARKS.md")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from gpt_dist.data.sample_corpus import write_sample_corpus
    from gpt_dist.tokenizer import load_tokenizer, train_tokenizer

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="preprocess_bench."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus = Path(args.corpus) if args.corpus else work / "corpus.jsonl"
        if not corpus.exists():
            write_sample_corpus(corpus, int(args.max_mb * 1e6))
        cases = set(args.cases.split(","))
        tok_dir = work / "tokenizer"
        if "sentencepiece" in cases and not (tok_dir / "gpt_dist_tokenizer.json").exists():
            train_tokenizer([corpus], args.vocab_size, tok_dir)
        vocab = load_tokenizer(tok_dir).vocab_size if "sentencepiece" in cases else 0
        bench = Contenders(args, corpus, tok_dir, work)
        order = [("ours", bench.ours), ("bare", bench.bare)] if "sentencepiece" in cases else []
        gpt2_note = ""
        if "gpt2_bpe" in cases:
            gpt2 = Path(args.gpt2_bpe) if args.gpt2_bpe else work / "gpt2_bpe"
            if not args.gpt2_bpe and not (gpt2 / "vocab.bpe").exists():
                train_gpt2_bpe(corpus, gpt2, args.gpt2_merges)
            g = load_tokenizer(gpt2)
            gpt2_note = (f"{g.vocab_size - 3:,} tokens, {'given' if args.gpt2_bpe else 'trained on the corpus'}, "
                         f"engine {g.engine}")
            order += [("ours_gpt2", lambda: bench.ours(gpt2, "ours_gpt2")), ("bare_gpt2", lambda: bench.bare(gpt2))]
        mlm_note = "no --megatron-lm given"
        if args.megatron_lm and "sentencepiece" in cases:
            path = Path(args.megatron_lm)
            if (path / "tools" / "preprocess_data.py").is_file():
                order.append(("megatron_lm", bench.megatron_lm))
                mlm_note = f"Megatron-LM {megatron_lm_version(path)}, SentencePieceTokenizer, same model, no eod"
            else:
                mlm_note = f"{path}/tools/preprocess_data.py not found"
        runs: dict[str, list[tuple[float, dict]]] = {name: [] for name, _ in order}
        load_before = load()
        for k in range(args.repeats):
            for name, fn in order[k % len(order):] + order[: k % len(order)]:  # rotate who goes first
                runs[name].append(fn())
                print(f"run {k + 1} {name}: {runs[name][-1][0]:.2f} s", flush=True)
        lines = summarize(args, corpus, vocab, runs, load_before, mlm_note, gpt2_note)
        print("\n".join(lines))
        if not args.no_append:
            print(f"added to {append(lines)}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
