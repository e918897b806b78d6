"""Crash-safe DeepSpeed checkpoints: write, verify, commit, then point ``latest`` at them.

DeepSpeed 0.19 writes ``latest`` before every rank has finished its shards and loads every
file with ``torch.load(weights_only=False)`` (RELIABILITY.md findings 6 and 8). So DeepSpeed
writes only the shards (``save_latest=False``); this module then

1. barriers, and every rank reports whether its writes succeeded (all-reduced, so a disk-full
   rank cannot leave the others waiting in a barrier);
2. hashes every file (the work split over ranks) into ``manifest.json``, the commit marker;
3. points ``latest`` at the tag by temporary file + fsync + rename.

Loading reads ``latest``, validates the tag (``global_stepN``, inside the checkpoint dir),
verifies the manifest (every file present with its size and sha256, nothing outside the
directory, no file the manifest does not list) *before* DeepSpeed opens any file, and falls
back to the previous committed checkpoint if asked to. Directories without a manifest are
crash leftovers: never loaded, never counted by retention, removed by the next good save.

Layout::

    RUN_DIR/checkpoints/latest                 "global_step200"
    RUN_DIR/checkpoints/global_step200/        DeepSpeed's files (mp_rank_*, zero_pp_rank_*,
                                               layer_* under pp), rng_rank_00000.pt per rank,
                                               manifest.json (files, sizes, sha256, config,
                                               step, consumed samples, layout)
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from gpt_dist.parallel import ParallelContext
from gpt_dist.utils import atomic_write_text, sha256_file

TAG_RE = re.compile(r"^global_step(\d+)$")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and the reason."""


class CheckpointCorruptError(CheckpointError):
    pass


class CheckpointSaveError(CheckpointError):
    pass


def ckpt_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> int:
    m = TAG_RE.match(tag)
    if not m:
        raise CheckpointCorruptError(f"checkpoint tag {tag!r} is not of the form global_stepN")
    return int(m.group(1))


def safe_tag_dir(root: Path, tag: str) -> Path:
    """The tag's directory, refusing anything that escapes ``root`` (../, /abs, symlinks)."""
    step_of(tag)
    path = root / tag
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.dirname(real) != real_root:
        raise CheckpointCorruptError(f"{path}: resolves outside the checkpoint directory {root}")
    return path


# --------------------------------------------------------------------------- save


def _all_ok(ok: bool, ctx: ParallelContext) -> bool:
    if not dist.is_initialized():
        return ok
    t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _hash_files(tag_dir: Path, ctx: ParallelContext) -> dict[str, dict[str, Any]]:
    files = sorted(p.name for p in tag_dir.iterdir() if p.is_file() and p.name != MANIFEST)
    mine = {n: {"size": (tag_dir / n).stat().st_size, "sha256": sha256_file(tag_dir / n)}
            for i, n in enumerate(files) if i % ctx.world_size == ctx.rank}
    if not dist.is_initialized() or ctx.world_size == 1:
        return mine
    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, mine)
    out: dict[str, dict[str, Any]] = {}
    for part in parts:
        out.update(part)
    return out


def save(engine: Any, ctx: ParallelContext, run_dir: Path, step: int, client_state: dict[str, Any],
         extra_manifest: dict[str, Any], rng_state: dict[str, Any], keep_last: int,
         on_disk_full: str = "fail") -> Optional[Path]:
    """Save, verify and commit ``global_step{step}``; returns its path (None if dropped)."""
    root = ckpt_root(run_dir)
    tag = tag_for(step)
    tag_dir = root / tag
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # an uncommitted leftover of a crashed save of this step
            shutil.rmtree(tag_dir)
    ctx.barrier()
    error: Optional[BaseException] = None
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rng_state, tag_dir / f"rng_rank_{ctx.rank:05d}.pt")
    except (OSError, RuntimeError) as exc:  # ENOSPC shows up as RuntimeError from torch.save
        error = exc
    if not _all_ok(error is None, ctx):
        if ctx.is_main and tag_dir.exists():
            shutil.rmtree(tag_dir, ignore_errors=True)
        ctx.barrier()
        reason = f"{error}" if error else "another rank failed to write its shard"
        full = error is not None and (getattr(error, "errno", None) in (errno.ENOSPC, errno.EFBIG)
                                      or "unexpected pos" in str(error) or "No space" in str(error))
        if on_disk_full == "continue" and (full or error is None):
            return None
        raise CheckpointSaveError(f"{tag_dir}: save failed on rank {ctx.rank}: {reason}")
    files = _hash_files(tag_dir, ctx)
    if ctx.is_main:
        empty = [n for n, f in files.items() if f["size"] == 0]
        if empty:
            raise CheckpointSaveError(f"{tag_dir}: zero-byte shard(s) {empty}")
        manifest = {"format_version": FORMAT_VERSION, "tag": tag, "step": step, "files": files,
                    "layout": {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp, "world_size": ctx.world_size},
                    **extra_manifest}
        atomic_write_text(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
        atomic_write_text(root / "latest", tag)  # the commit point
        _retention(root, keep_last, tag)
    ctx.barrier()
    return tag_dir


def committed_tags(root: Path) -> list[str]:
    """Tags with a manifest, oldest first (uncommitted directories are not checkpoints)."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if TAG_RE.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(tags, key=step_of)


def _retention(root: Path, keep_last: int, newest: str) -> None:
    """Delete committed checkpoints beyond keep_last (never ``newest``) and crash leftovers."""
    for p in root.iterdir():
        if p.is_dir() and TAG_RE.match(p.name) and not (p / MANIFEST).exists() and p.name != newest:
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".") and ".tmp" in p.name:
            p.unlink(missing_ok=True) if p.is_file() else shutil.rmtree(p, ignore_errors=True)
    tags = [t for t in committed_tags(root) if t != newest]
    for tag in tags[: max(0, len(tags) - max(keep_last - 1, 0))]:
        # Remove the manifest first: a crash mid-delete leaves an uncommitted directory.
        (root / tag / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(root / tag, ignore_errors=True)


# --------------------------------------------------------------------------- verify / load


def verify(tag_dir: Path, check_hash: bool = True) -> dict[str, Any]:
    """Check ``tag_dir`` against its manifest; returns the manifest or raises, naming the file."""
    mpath = tag_dir / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{mpath}: missing (checkpoint was never committed)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointCorruptError(f"{mpath}: unreadable ({exc})") from None
    files = manifest.get("files")
    if not isinstance(files, dict) or manifest.get("tag") != tag_dir.name:
        raise CheckpointCorruptError(f"{mpath}: not a gpt_dist manifest for {tag_dir.name}")
    on_disk = {p.name for p in tag_dir.iterdir() if p.name != MANIFEST}
    for name, info in files.items():
        if "/" in name or name in ("..", ".") or name.startswith("."):
            raise CheckpointCorruptError(f"{mpath}: file name {name!r} escapes the checkpoint")
        path = tag_dir / name
        if path.is_symlink() or not path.is_file():
            raise CheckpointCorruptError(f"{path}: missing or not a regular file")
        size = path.stat().st_size
        if size != info.get("size"):
            raise CheckpointCorruptError(f"{path}: size {size} != manifest {info.get('size')}")
        if check_hash and sha256_file(path) != info.get("sha256"):
            raise CheckpointCorruptError(f"{path}: sha256 mismatch with manifest")
    unlisted = on_disk - set(files)
    if unlisted:
        raise CheckpointCorruptError(f"{tag_dir}: files not in the manifest: {sorted(unlisted)}")
    return manifest


def read_latest(root: Path) -> Optional[str]:
    path = root / "latest"
    if not path.exists():
        return None
    tag = path.read_text().strip()
    safe_tag_dir(root, tag)
    return tag


@dataclass
class Found:
    tag: str
    path: Path
    manifest: dict[str, Any]
    skipped: list[str]


def find_resumable(run_dir: Path, on_corrupt: str = "fail", check_hash: bool = True) -> Optional[Found]:
    """The checkpoint to resume from: ``latest`` if it verifies; else fail or fall back."""
    root = ckpt_root(run_dir)
    skipped: list[str] = []
    try:
        latest = read_latest(root)
    except CheckpointCorruptError as exc:
        if on_corrupt != "fallback":
            raise
        latest, skipped = None, [f"latest: {exc}"]
    candidates = committed_tags(root)[::-1]
    if latest is not None:
        candidates = [latest] + [t for t in candidates if step_of(t) < step_of(latest)]
    elif not candidates and not skipped and not (root / "latest").exists():
        return None
    for tag in candidates:
        try:
            path = safe_tag_dir(root, tag)
            return Found(tag, path, verify(path, check_hash), skipped)
        except CheckpointCorruptError as exc:
            if on_corrupt != "fallback":
                raise
            skipped.append(f"{tag}: {exc}")
    raise CheckpointCorruptError(f"{root}: no valid checkpoint ({'; '.join(skipped) or 'none committed'})")


def load_rng(tag_dir: Path, rank: int) -> Optional[dict[str, Any]]:
    path = tag_dir / f"rng_rank_{rank:05d}.pt"
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
