"""Input discovery and streaming: JSONL, gzip-compressed JSONL and plain-text files.

Why the reader yields *raw bytes* and not parsed documents: parsing, decoding and
cleaning run in worker processes, and the parent only has to cut lines and remember
where each one came from (file, line, byte offset) so that every rejected line can be
reported and an interrupted run can resume at an exact position. Lines longer than a
bound are skipped without being held in memory, so memory stays bounded whatever the
input holds.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".text", ".md")
BOM = b"\xef\xbb\xbf"
SURROGATES = re.compile("[\ud800-\udfff]")  # lone ones survive json.loads; UTF-8 cannot hold them


class InputError(Exception):
    """An input cannot be used; ``path`` is named in the one-line message."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class InputFile:
    """One input file: how to read it and its identity for resume checks."""

    path: str
    kind: str  # "jsonl" | "text"
    compressed: bool
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Position:
    """Where reading continues: file index, byte offset (uncompressed) and next line number."""

    file: int = 0
    offset: int = 0
    line: int = 1


@dataclass
class RawRecord:
    """One candidate document before parsing. ``error`` is set when it is already bad."""

    file: int
    line: int
    data: bytes | None
    error: str | None
    end: Position  # the position right after this record


def _kind_of(path: str) -> tuple[str, bool]:
    name = path.lower()
    compressed = name.endswith(".gz")
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", compressed
    return "text", compressed


def _describe(path: str) -> InputFile:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(path, "no such file or directory") from None
    except OSError as exc:
        raise InputError(path, exc.strerror or str(exc)) from None
    if not os.access(path, os.R_OK):
        raise InputError(path, "permission denied")
    kind, compressed = _kind_of(path)
    return InputFile(path=path, kind=kind, compressed=compressed, size=st.st_size, mtime_ns=st.st_mtime_ns)


def resolve_inputs(specs: Sequence[str | Path]) -> list[InputFile]:
    """Files named by ``specs`` (paths, globs, directories), sorted within each spec.

    A directory contributes its JSONL/text files recursively. A spec that matches nothing
    raises :class:`InputError` naming it: a typo must not silently drop a corpus.
    """
    seen: set[str] = set()
    out: list[InputFile] = []
    for spec in map(str, specs):
        if glob.has_magic(spec):
            paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not paths:
                raise InputError(spec, "no input file matches this pattern")
        elif os.path.isdir(spec):
            paths = sorted(str(p) for p in Path(spec).rglob("*")
                           if p.is_file() and str(p).lower().endswith(JSONL_SUFFIXES + TEXT_SUFFIXES))
            if not paths:
                raise InputError(spec, "directory holds no .jsonl/.jsonl.gz/.txt input files")
        else:
            paths = [spec]
        for p in paths:
            if p not in seen:
                seen.add(p)
                out.append(_describe(p))
    if not out:
        raise InputError("--input", "no input files given")
    return out


def _open(f: InputFile) -> BinaryIO:
    try:
        return gzip.open(f.path, "rb") if f.compressed else open(f.path, "rb")  # type: ignore[return-value]
    except OSError as exc:
        raise InputError(f.path, exc.strerror or str(exc)) from None


def iter_records(files: Sequence[InputFile], start: Position = Position(),
                 max_bytes: int = 8_000_000) -> Iterator[RawRecord]:
    """Raw records of every file from ``start`` on, in order.

    JSONL: one record per non-blank line (a UTF-8 BOM on line 1 is dropped). Text: one
    record per file. A line or file over ``max_bytes`` becomes an error record without
    being read into memory; a corrupt gzip stream ends its file with an error record.
    """
    for index in range(start.file, len(files)):
        f = files[index]
        offset, line = (start.offset, start.line) if index == start.file else (0, 1)
        if f.kind == "text":
            if offset > 0:
                continue  # this file was finished before the resume point
            yield _text_record(f, index, max_bytes)
            continue
        yield from _jsonl_records(f, index, offset, line, max_bytes)


def _text_record(f: InputFile, index: int, max_bytes: int) -> RawRecord:
    end = Position(index, max(f.size, 1), 2)
    if not f.compressed and f.size > max_bytes:
        return RawRecord(index, 1, None, f"document larger than {max_bytes} bytes", end)
    try:
        with _open(f) as fh:
            data = fh.read(max_bytes + 1)
    except (OSError, EOFError) as exc:
        return RawRecord(index, 1, None, f"unreadable: {exc}", end)
    if len(data) > max_bytes:
        return RawRecord(index, 1, None, f"document larger than {max_bytes} bytes", end)
    return RawRecord(index, 1, data.removeprefix(BOM), None, end)


def _jsonl_records(f: InputFile, index: int, offset: int, line: int, max_bytes: int) -> Iterator[RawRecord]:
    fh = _open(f)
    try:
        if offset:
            fh.seek(offset)
        while True:
            try:
                data = fh.readline(max_bytes + 1)
            except (OSError, EOFError) as exc:  # truncated or corrupt gzip
                yield RawRecord(index, line, None, f"unreadable from here on: {exc}", Position(index + 1, 0, 1))
                return
            if not data:
                return
            offset += len(data)
            error = None
            if len(data) > max_bytes and not data.endswith(b"\n"):
                # skip the rest of the over-long line without keeping it
                while data and not data.endswith(b"\n"):
                    try:
                        data = fh.readline(1 << 20)
                    except (OSError, EOFError):
                        data = b""
                    offset += len(data)
                data, error = None, f"line longer than {max_bytes} bytes"
            elif line == 1:
                data = data.removeprefix(BOM)
            this_line = line
            line += 1
            if data is not None and not data.strip():
                continue  # blank lines separate nothing in JSONL; not a document
            yield RawRecord(index, this_line, data, error, Position(index, offset, line))
    finally:
        fh.close()


def iter_texts(specs: Sequence[str | Path], text_key: str = "text") -> Iterator[str]:
    """Every readable document text of ``specs``, skipping bad records silently.

    For tokenizer training, where a bad line should neither stop nor skew training.
    """
    files = resolve_inputs(specs)
    for rec in iter_records(files):
        if rec.data is None:
            continue
        try:
            text = rec.data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if files[rec.file].kind == "jsonl":
            try:
                obj = json.loads(text, strict=False)
            except ValueError:
                continue
            text = obj.get(text_key) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                continue
        if text.strip():
            yield SURROGATES.sub("\ufffd", text)


def total_size(files: Iterable[InputFile]) -> int:
    """Bytes on disk of all inputs (compressed size for .gz), for progress reporting."""
    return sum(f.size for f in files)
