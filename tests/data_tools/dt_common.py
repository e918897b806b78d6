"""Helpers shared by the data-tools tests and the T10/T11 reliability tests.

Everything expensive (the corpus, the tokenizer, each preprocessing run) is built once
per session and shared: importing megatron-core alone costs ~8 s per process on the CI
machine, so most runs happen in-process and only what needs a separate process (exit
codes, signals, ``python -O``) runs one.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
VOCAB = 400


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(extra)
    return env


def run_cli(script: str, *args: str, timeout: float = 120, env: dict[str, str] | None = None,
            flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, *flags, str(ROOT / "data_tools" / script), *map(str, args)], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env or cli_env())


def make_base_docs(dt_tmp: Path) -> list[str]:
    """~260 real English documents (stdlib docstrings) that pass every default filter and
    are pairwise distinct for the deduplicator, so planted duplicates are the only ones."""
    from gpt_dist.data.clean import CleanConfig, clean_text, filter_reason
    from gpt_dist.data.dedup import DedupConfig, Deduplicator, MinHasher, exact_key
    from gpt_dist.data.sample_corpus import write_sample_corpus

    path = dt_tmp / "stdlib.jsonl"
    write_sample_corpus(path, max_bytes=10**9, packages=False, max_docs=320, max_doc_chars=4000)
    cfg, dcfg = CleanConfig(), DedupConfig()
    mh = MinHasher(dcfg)
    dd = Deduplicator(dcfg, mh.bands)
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["text"]
        c = clean_text(text).text
        if c != text or filter_reason(c, cfg) is not None:
            continue  # keep documents that cleaning leaves as they are: simpler oracles
        if dd.check(exact_key(c), mh.band_keys(c)) is None:
            out.append(c)
    assert len(out) >= 220, len(out)
    return out


def make_sp_dir(dt_tmp: Path, base_docs: list[str]) -> Path:
    """A sentencepiece BPE tokenizer (vocab 400) trained on the base documents."""
    from gpt_dist.tokenizer import train_tokenizer

    corpus = dt_tmp / "tok_corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in base_docs), encoding="utf-8")
    out = dt_tmp / "sp"
    train_tokenizer([corpus], VOCAB, out, num_threads=1)
    return out


# ---- the multi-input run: planted filter failures and duplicates -------------------------

SHORT = "Too short to keep."
LOW_ALPHA = "1234 5678 9012 3456 7890 ++++ ---- //// 1234 5678 9012 3456 7890 ==== **** #### 1234 5678 $$$$"
REPEATED = "\n".join(["Buy cheap watches now at our online store today."] * 6
                     + ["Unique line one about the shop.", "Another unique line."])


def near_copy(text: str, every: int = 100) -> str:
    """The same document with one word in ``every`` changed (100: Jaccard of the
    shingles ~0.9, above the default 0.8 threshold)."""
    words = text.split(" ")
    for i in range(7, len(words), every):
        words[i] = "changed"
    out = " ".join(words)
    assert out != text
    return out


def long_doc_index(docs: list[str], start: int, min_words: int = 300) -> int:
    return next(i for i in range(start, len(docs)) if len(docs[i].split(" ")) >= min_words)


@dataclass
class MultiRun:
    prefix: str
    manifest: dict
    expected: list[str]  # cleaned texts of the documents that must be kept, in order
    inputs: list[Path]
    planted: dict[str, int]


def make_multi_run(dt_tmp: Path, base_docs: list[str], sp_dir: Path) -> MultiRun:
    """Preprocess (in-process) a .jsonl, a .jsonl.gz (via a glob) and a directory of .txt
    files, with planted filter failures and exact/near duplicates, into several shards."""
    from gpt_dist.data.preprocess import PreprocessConfig, preprocess

    src = dt_tmp / "multi"
    (src / "texts").mkdir(parents=True)
    a_docs = base_docs[:40]
    long_doc = " ".join([f"lengthy prose sentence number {i} goes here." for i in range(3000)])  # > 100k chars
    b_docs = base_docs[40:80]
    b_lines = list(b_docs)
    # planted: an exact copy (after cleaning: trailing spaces and CRLF differ), a near copy
    b_lines.insert(5, a_docs[3].replace("\n", "  \r\n"))
    b_lines.insert(12, near_copy(a_docs[long_doc_index(a_docs, 10)]))
    b_lines.insert(20, SHORT)
    b_lines.insert(25, LOW_ALPHA)
    b_lines.insert(30, REPEATED)
    b_lines.insert(31, long_doc)
    (src / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in a_docs), encoding="utf-8")
    with gzip.open(src / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t, "source": "b"}) + "\n" for t in b_lines))
    txt_docs = base_docs[80:84]
    for i, t in enumerate(txt_docs):
        (src / "texts" / f"doc{i}.txt").write_text(t + "\n", encoding="utf-8")
    prefix = str(dt_tmp / "out_multi" / "corpus")
    manifest = preprocess(PreprocessConfig(inputs=[str(src / "*.jsonl*"), str(src / "texts")], tokenizer=str(sp_dir),
                                           output_prefix=prefix, workers=0, shard_tokens=60_000, progress=False))
    inputs = [src / "a.jsonl", src / "b.jsonl.gz"] + [src / "texts" / f"doc{i}.txt" for i in range(4)]
    return MultiRun(prefix, manifest, a_docs + b_docs + txt_docs, inputs,
                    {"exact": 1, "near": 1, "too_short": 1, "low_alpha": 1, "repeated_lines": 1, "too_long": 1})


def read_docs(prefix: str) -> list[np.ndarray]:
    """Every document of every shard of ``prefix``, read by megatron-core's IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from gpt_dist.data.indexed import list_shards

    out = []
    for s in list_shards(prefix):
        ds = IndexedDataset(s, mmap=True)
        out += [np.array(ds[i]) for i in range(len(ds))]  # copies: views die with the dataset
    return out


# ---- T10: the bad-input corpus ------------------------------------------------------------

@dataclass
class T10Corpus:
    path: Path
    valid: list[str]  # the documents that must be kept (raw texts, before cleaning)
    bad: dict[int, str]  # line number -> expected reject reason
    surrogates: int
    first_bad: int


def make_t10_corpus(dt_tmp: Path, base_docs: list[str]) -> T10Corpus:
    valid = list(base_docs[:200])
    valid[7] = valid[7] + " \ud800 (a lone surrogate)"
    valid[9] = valid[9].replace(" ", "\x00 ", 3)  # NUL characters: removed, document kept
    valid[11] = valid[11].replace("\n", "\r\n")  # CRLF inside the text
    lines: list[bytes] = []
    bad: dict[int, str] = {}
    bad_lines = {
        3: (b'{"text": ""}', "empty"),
        6: (b'{"text": "unterminated', "malformed_json"),
        10: (b'{"body": "no text key here"}', "missing_key"),
        14: (b'{"text": "bad bytes \xff\xfe here, otherwise a fine sentence."}', "invalid_utf8"),
        20: (json.dumps({"text": "huge document " * 150_000}).encode(), "too_large"),  # ~2.1 MB
        25: (b'{"text": 12345}', "not_string"),
    }
    docs = iter(valid)
    n = 1
    while True:
        if n in bad_lines:
            data, reason = bad_lines[n]
            bad[n] = reason
        else:
            t = next(docs, None)
            if t is None:
                break
            data = json.dumps({"text": t}).encode()
            if n == 1:
                data = b"\xef\xbb\xbf" + data  # UTF-8 BOM on line 1
        ending = b"\r\n" if n % 3 == 0 else b"\n"  # CRLF line endings on some lines
        lines.append(data + ending)
        n += 1
    path = dt_tmp / "t10" / "t10.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"".join(lines))
    return T10Corpus(path, valid, bad, surrogates=1, first_bad=min(bad))


def t10_prefix(dt_tmp: Path, name: str) -> str:
    return str(dt_tmp / "t10" / name / "out")


# ---- shard mutations (T11 and inspect_shards) ----------------------------------------------

HEADER = 34  # magic 9, version 8, dtype code 1, sequence count 8, document count 8


def _counts(idx: Path) -> tuple[int, int]:
    import struct

    data = idx.read_bytes()
    _, _, n_seq, n_doc = struct.unpack("<QBQQ", data[9:HEADER])
    return n_seq, n_doc


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def mutate(prefix: str, case: str, other: str | None = None) -> None:
    """Damage shard ``prefix`` in one way (``other``: a second, larger shard)."""
    import shutil
    import struct

    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    n_seq, n_doc = _counts(idx)
    itemsize = 2  # the test shards are uint16
    if case == "truncate_bin":
        with open(bin_, "r+b") as f:
            f.truncate(bin_.stat().st_size - itemsize)
    elif case == "swap_bin":
        assert other is not None and Path(other + ".bin").stat().st_size > bin_.stat().st_size
        shutil.copyfile(other + ".bin", bin_)
    elif case == "bad_magic":
        _patch(idx, 0, b"XXIDIDX\x00\x00")
    elif case == "truncate_idx":
        with open(idx, "r+b") as f:
            f.truncate(idx.stat().st_size - 8)
    elif case == "dtype_float":
        _patch(idx, 17, bytes([6]))  # float64: not a token type
    elif case == "dtype_int32":
        _patch(idx, 17, bytes([4]))  # int32: reinterprets the bytes
    elif case == "doc_idx_decreasing":
        assert n_doc >= 3
        _patch(idx, HEADER + 12 * n_seq + 8 * 2, struct.pack("<q", 0))
        _patch(idx, HEADER + 12 * n_seq + 8 * 1, struct.pack("<q", 2))
    elif case == "doc_idx_last":
        _patch(idx, HEADER + 12 * n_seq + 8 * (n_doc - 1), struct.pack("<q", n_seq - 1))
    elif case == "pointers_overlap":
        assert n_seq >= 2
        _patch(idx, HEADER + 4 * n_seq + 8, struct.pack("<q", 0))
    elif case == "edit_length":  # an edited .idx: one document longer, so the .bin looks short
        length = struct.unpack("<i", idx.read_bytes()[HEADER:HEADER + 4])[0]
        _patch(idx, HEADER, struct.pack("<i", length + 1))
    elif case == "edit_token":  # same size, different content: only the hash sees it
        data = bytearray(bin_.read_bytes()[:2])
        data[0] ^= 0x01
        _patch(bin_, 0, bytes(data))
    else:
        raise ValueError(case)


# the check each mutation must be rejected by (ShardFormatError message "(check: ...)")
MUTATION_CHECKS = {
    "truncate_bin": "bin size", "swap_bin": "bin size", "bad_magic": "idx magic", "truncate_idx": "idx size",
    "dtype_float": "dtype code", "dtype_int32": "pointers", "doc_idx_decreasing": "document_indices",
    "doc_idx_last": "document_indices", "pointers_overlap": "pointers", "edit_length": "pointers",
}


def copy_shards(src_prefix: str, dest_dir: Path) -> str:
    """Copy every file of an output prefix into ``dest_dir``; returns the new prefix."""
    import shutil

    dest_dir.mkdir(parents=True)
    name = Path(src_prefix).name
    for p in Path(src_prefix).parent.glob(name + "*"):
        if p.is_file():
            shutil.copyfile(p, dest_dir / p.name)
    return str(dest_dir / name)
