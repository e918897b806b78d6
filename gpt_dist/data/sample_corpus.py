"""A WebText-like sample corpus built from English text already on this machine.

Why: ``make demo`` and the tests need real English documents of realistic length, and
nothing may be downloaded. Every machine that runs gpt_dist has Python's standard
library and the project's dependencies installed, and their docstrings, package
descriptions (``*.dist-info/METADATA``) and documentation files are exactly that:
prose written by people, with code samples mixed in, like much of WebText.

Files are visited in an order fixed by a hash of their path *relative to* the library
root, so the same installation always yields the same corpus, wherever the virtual
environment lives. One document is one source file's docstrings (or one description),
split at section boundaries when longer than ``max_doc_chars``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from gpt_dist.utils import atomic_open

DOC_SUFFIXES = (".rst", ".md", ".txt")
SKIP_DIRS = {"__pycache__", "tests", "test", "testing", "idlelib", "site-packages", "lib2to3"}
MAX_FILE_BYTES = 400_000  # larger files are mostly generated code or data tables


def library_roots(packages: bool = True) -> list[tuple[str, Path]]:
    """(label, directory) of the standard library and (optionally) the installed packages.

    The standard library alone (about 1.4 MB of docstrings) is the same on every machine
    with the same Python version; the packages add variety and volume.
    """
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]))]
    purelib = Path(paths["purelib"])
    if packages and purelib.is_dir():
        roots.append(("site-packages", purelib))
    return roots


def _candidate_files(label: str, root: Path) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        # the stdlib walk must not descend into a venv's site-packages beneath it
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            is_meta = name == "METADATA" and rel_dir.name.endswith(".dist-info")
            if name.endswith(".py") or name.endswith(DOC_SUFFIXES) or is_meta:
                yield f"{label}/{(rel_dir / name).as_posix()}", Path(dirpath) / name


# A docstring is a triple-quoted string that opens a block (after "def ...:" or
# "class ...:") or the module. Regular expressions find them about 50x faster than
# ast.parse, which matters because the corpus is rebuilt by tests and the demo.
_BLOCK_DOC = re.compile(r':[ \t]*(?:#[^\n]*)?\n[ \t]*[rRuU]?("""|\'\'\')(.*?)\1', re.DOTALL)
_MODULE_DOC = re.compile(r'\A(?:[ \t]*(?:#[^\n]*)?\n)*[ \t]*[rRuU]?("""|\'\'\')(.*?)\1', re.DOTALL)
_HEADER = re.compile(r"(?:def|class)[ \t]+(\w+)")


def _python_sections(source: str) -> list[str]:
    """Module, class and function docstrings of one source file, in source order."""
    sections: list[str] = []
    module = _MODULE_DOC.match(source)
    if module and module.group(2).strip():
        sections.append(inspect.cleandoc(module.group(2)).strip())
    for m in _BLOCK_DOC.finditer(source):
        doc = inspect.cleandoc(m.group(2)).strip()
        headers = _HEADER.findall(source, max(0, m.start() - 2000), m.start())
        if len(doc) >= 40 and headers and not headers[-1].startswith("_"):
            sections.append(f"{headers[-1]}\n\n{doc}")
    return sections


def _metadata_sections(text: str) -> list[str]:
    """The long description of a ``METADATA`` file: everything after the headers."""
    _, sep, body = text.partition("\n\n")
    return [body.strip()] if sep and body.strip() else []


def _split(sections: list[str], max_chars: int) -> list[str]:
    """Join sections into documents of at most ``max_chars`` (a longer section stands alone)."""
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for sec in sections:
        if current and size + len(sec) > max_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
        current.append(sec)
        size += len(sec) + 2
    if current:
        docs.append("\n\n".join(current))
    return docs


def iter_documents(max_doc_chars: int = 12_000, min_doc_chars: int = 300,
                   packages: bool = True) -> Iterator[dict[str, str]]:
    """Yield ``{"text", "source"}`` documents in a deterministic order (no size limit)."""
    files = [f for label, root in library_roots(packages) for f in _candidate_files(label, root)]
    files.sort(key=lambda item: (hashlib.sha1(item[0].encode()).hexdigest(), item[0]))
    for rel, path in files:
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if rel.endswith(".py"):
            sections = _python_sections(text)
        elif rel.endswith("METADATA"):
            sections = _metadata_sections(text)
        else:
            sections = [inspect.cleandoc(text)] if text.strip() else []
        for i, doc in enumerate(_split(sections, max_doc_chars)):
            if len(doc) >= min_doc_chars:
                yield {"text": doc, "source": f"{rel}#{i}" if i else rel}


def write_sample_corpus(out: str | Path, max_bytes: int = 4_000_000, max_doc_chars: int = 12_000,
                        packages: bool = True, max_docs: int | None = None) -> dict[str, int]:
    """Write the corpus as JSONL (atomically) until ``max_bytes`` of text; returns counts."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    docs = total = 0
    with atomic_open(out, "w") as f:
        for doc in iter_documents(max_doc_chars=max_doc_chars, packages=packages):
            line = json.dumps(doc, ensure_ascii=False)
            f.write(line + "\n")
            docs += 1
            total += len(doc["text"].encode("utf-8"))
            if total >= max_bytes or (max_docs is not None and docs >= max_docs):
                break
    return {"documents": docs, "text_bytes": total, "file_bytes": out.stat().st_size}
