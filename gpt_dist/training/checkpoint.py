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

Signed manifests (RELIABILITY.md T14(c)). A manifest whose hashes verify proves only that
the files match *some* manifest; DeepSpeed then unpickles them with ``weights_only=False``.
So the saver signs ``manifest.json`` with HMAC-SHA256 under a per-run key,
``RUN_DIR/checkpoints/.manifest_key`` (32 random bytes, hex, mode 0600, created by rank 0 on
the run's first save, never overwritten). ``verify`` refuses a manifest that is unsigned or
whose signature does not match the key, before any checkpoint file is opened, unless the
environment sets ``GPT_DIST_TRUST_CHECKPOINT=1`` (hashes and sizes are still checked then).
A checkpoint copied into another run directory therefore needs that run's key copied with
it (or the override): checkpoints from elsewhere are not trusted by default. A key file that
is a symlink or writable by group/others is refused.

Disk full (T5). A rank whose write fails (``OSError`` such as ENOSPC, or torch's
"unexpected pos" ``RuntimeError``) records the error and lets DeepSpeed reach its own
barrier; the ranks then all-reduce a status (0 ok, 1 disk full, 2 other error), delete the
partial directory and decide together: ``checkpoint.on_disk_full=fail`` (default) raises
``CheckpointSaveError`` naming the path on every rank (the run exits non-zero, ``latest``
unchanged); ``continue`` drops this save on every rank and training goes on.

Hooks (``gpt_dist.training.hooks.TrainHooks``, passed by the caller; none by default):
``on_checkpoint_write`` runs before every file this rank writes (an ``OSError`` it raises is
that write failing), ``on_checkpoint_phase`` at ``before_commit`` and ``retention``. The
reliability suite kills ranks and fills the disk through them (tests/faults.py).

Layout::

    RUN_DIR/checkpoints/latest                 "global_step200"
    RUN_DIR/checkpoints/global_step200/        DeepSpeed's files (mp_rank_*, zero_pp_rank_*,
                                               layer_* under pp), rng_rank_00000.pt per rank,
                                               manifest.json (files, sizes, sha256, config,
                                               step, consumed samples, layout)
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gpt_dist.parallel import ParallelContext
from gpt_dist.training.hooks import NO_HOOKS, TrainHooks
from gpt_dist.utils import atomic_write_text, sha256_file

TAG_RE = re.compile(r"^global_step(\d+)$")
MANIFEST = "manifest.json"
KEY_FILE = ".manifest_key"
TRUST_ENV = "GPT_DIST_TRUST_CHECKPOINT"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and the reason."""


class CheckpointCorruptError(CheckpointError):
    pass


class CheckpointSaveError(CheckpointError):
    pass


class CheckpointUntrustedError(CheckpointCorruptError):
    """The manifest is not signed with this run's key (not written by our saver)."""


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


# --------------------------------------------------------------------------- manifest signing


def _key_path(root: Path) -> Path:
    return Path(root) / KEY_FILE


def manifest_key(root: Path, create: bool = False) -> bytes | None:
    """The run's HMAC key; created (0600, O_EXCL) when ``create`` and absent."""
    path = _key_path(root)
    if create and not os.path.lexists(path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
                fh.flush()
                os.fsync(fh.fileno())
    if not os.path.lexists(path):
        return None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise CheckpointUntrustedError(f"{path}: manifest key is not a regular file")
    if st.st_mode & 0o022:
        raise CheckpointUntrustedError(f"{path}: manifest key is writable by group/others "
                                       f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it")
    key = path.read_text().strip()
    if not re.fullmatch(r"[0-9a-f]{64}", key):
        raise CheckpointUntrustedError(f"{path}: malformed manifest key")
    return bytes.fromhex(key)


def _canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_manifest(manifest: dict[str, Any], key: bytes) -> dict[str, Any]:
    out = dict(manifest)
    out["signature"] = {"alg": "hmac-sha256",
                        "value": hmac.new(key, _canonical(manifest), hashlib.sha256).hexdigest()}
    return out


def _check_signature(mpath: Path, manifest: dict[str, Any]) -> None:
    if os.environ.get(TRUST_ENV) == "1":
        return
    root = mpath.parent.parent
    sig = manifest.get("signature")
    if not isinstance(sig, dict) or sig.get("alg") != "hmac-sha256" or not isinstance(sig.get("value"), str):
        raise CheckpointUntrustedError(
            f"{mpath}: manifest is not signed by gpt_dist's saver; refusing to load it "
            f"(set {TRUST_ENV}=1 to trust a checkpoint from elsewhere)")
    key = manifest_key(root)
    if key is None:
        raise CheckpointUntrustedError(
            f"{mpath}: no manifest key {_key_path(root)} to check its signature against; "
            f"copy the writing run's key there or set {TRUST_ENV}=1")
    want = hmac.new(key, _canonical(manifest), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, sig["value"]):
        raise CheckpointUntrustedError(
            f"{mpath}: manifest signature does not match {_key_path(root)} (altered, or written "
            f"by another run); set {TRUST_ENV}=1 to trust it")


# --------------------------------------------------------------------------- save


def _max_status(status: int, ctx: ParallelContext) -> int:
    if not dist.is_initialized():
        return status
    t = torch.tensor([status], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _is_disk_full(exc: BaseException) -> bool:
    return (getattr(exc, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
            or "unexpected pos" in str(exc) or "No space" in str(exc))


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
         on_disk_full: str = "fail", hooks: TrainHooks = NO_HOOKS) -> Path | None:
    """Save, verify and commit ``global_step{step}``; returns its path (None if dropped)."""
    root = ckpt_root(run_dir)
    tag = tag_for(step)
    tag_dir = root / tag
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # an uncommitted leftover of a crashed save of this step
            shutil.rmtree(tag_dir)
    ctx.barrier()
    errors: list[BaseException] = []
    ce = getattr(engine, "checkpoint_engine", None)
    original = getattr(ce, "save", None)

    def guarded(state_dict: Any, path: str) -> Any:
        # A failed write is recorded, not raised, so DeepSpeed still reaches its own final
        # barrier on this rank; the ranks then agree on the outcome below (never a hang).
        try:
            hooks.on_checkpoint_write(step, ctx.rank, Path(path), state_dict)
            return original(state_dict, path)
        except (OSError, RuntimeError) as exc:  # ENOSPC is a RuntimeError from torch.save
            errors.append(exc)
            return None

    if ce is not None and original is not None:
        ce.save = guarded
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as exc:
        errors.append(exc)
    finally:
        if ce is not None and original is not None:
            ce.save = original
    if not errors:
        try:
            rng_path = tag_dir / f"rng_rank_{ctx.rank:05d}.pt"
            hooks.on_checkpoint_write(step, ctx.rank, rng_path, rng_state)
            torch.save(rng_state, rng_path)
        except (OSError, RuntimeError) as exc:
            errors.append(exc)
    error = errors[0] if errors else None
    status = 0 if error is None else (1 if _is_disk_full(error) else 2)
    status = _max_status(status, ctx)
    if status:
        if ctx.is_main and tag_dir.exists():
            shutil.rmtree(tag_dir, ignore_errors=True)
        ctx.barrier()
        if on_disk_full == "continue" and status == 1:
            return None
        reason = f"{error}" if error else "another rank failed to write its checkpoint files"
        raise CheckpointSaveError(f"{tag_dir}: save failed on rank {ctx.rank}: {reason}")
    hooks.on_checkpoint_phase(step, ctx.rank, "before_commit")
    files = _hash_files(tag_dir, ctx)
    if ctx.is_main:
        empty = [n for n, f in files.items() if f["size"] == 0]
        if empty:
            raise CheckpointSaveError(f"{tag_dir}: zero-byte shard(s) {empty}")
        manifest = {"format_version": FORMAT_VERSION, "tag": tag, "step": step, "files": files,
                    "layout": {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp, "world_size": ctx.world_size},
                    **extra_manifest}
        manifest = sign_manifest(manifest, manifest_key(root, create=True))  # type: ignore[arg-type]
        atomic_write_text(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
        atomic_write_text(root / "latest", tag)  # the commit point
        _retention(root, keep_last, tag, step, hooks)
    ctx.barrier()
    return tag_dir


def committed_tags(root: Path) -> list[str]:
    """Tags with a manifest, oldest first (uncommitted directories are not checkpoints)."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir()
            if TAG_RE.match(p.name) and not p.is_symlink() and (p / MANIFEST).is_file()]
    return sorted(tags, key=step_of)


def _retention(root: Path, keep_last: int, newest: str, step: int = -1,
               hooks: TrainHooks = NO_HOOKS) -> None:
    """Delete committed checkpoints beyond keep_last (never ``newest``) and crash leftovers."""
    for p in root.iterdir():
        if p.is_symlink():  # never follow a link out of the checkpoint directory
            continue
        if p.is_dir() and TAG_RE.match(p.name) and not (p / MANIFEST).exists() and p.name != newest:
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".") and ".tmp" in p.name:
            p.unlink(missing_ok=True) if p.is_file() else shutil.rmtree(p, ignore_errors=True)
    tags = [t for t in committed_tags(root) if t != newest]
    for tag in tags[: max(0, len(tags) - max(keep_last - 1, 0))]:
        # Remove the manifest first: a crash mid-delete leaves an uncommitted directory.
        (root / tag / MANIFEST).unlink(missing_ok=True)
        hooks.on_checkpoint_phase(step, 0, "retention")
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
    if not isinstance(manifest, dict):
        raise CheckpointCorruptError(f"{mpath}: not a gpt_dist manifest")
    _check_signature(mpath, manifest)
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


def read_latest(root: Path) -> str | None:
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


def find_resumable(run_dir: Path, on_corrupt: str = "fail", check_hash: bool = True) -> Found | None:
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


def load_rng(tag_dir: Path, rank: int) -> dict[str, Any] | None:
    path = tag_dir / f"rng_rank_{rank:05d}.pt"
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
