"""Small helpers shared by every part: atomic writes and hashing (no torch import: the data
tools use them too).

Every file the project writes goes through ``atomic_path`` (a unique temporary name, fsync,
rename, fsync of the directory), so a crash never leaves a half-written file under its final
name (RELIABILITY.md finding 6). Multi-file commits with an order of their own (a shard's
``.bin``/``.idx``, a checkpoint's manifest then ``latest``) build on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_CHUNK = 1 << 22


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename inside it survives a power loss."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """The one atomic-write rule: yield a temporary path next to ``path`` for the caller to
    write (by name: safetensors, numpy), then fsync it, rename it over ``path`` and fsync the
    directory. The temporary name is unique per writer (``mkstemp``, not the pid, which
    repeats across hosts sharing a file system: several ranks may write the same cache entry
    at once, and each rename is atomic, so readers see the old file or a whole new one). On
    any error the temporary file is removed and ``path`` is untouched. Permissions are the
    umask's, as for a plain ``open``."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp creates 0600
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """``open(path, mode)`` that streams into ``atomic_path``'s temporary file."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else encoding) as fh:
        yield fh
        fh.flush()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, **dumps: Any) -> None:
    """JSON (``json.dumps(obj, **dumps)`` plus a newline), written atomically."""
    atomic_write_text(path, json.dumps(obj, **dumps) + "\n")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}P"
