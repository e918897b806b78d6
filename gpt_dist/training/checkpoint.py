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
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gpt_dist import deepspeed_compat
from gpt_dist.checkpoint_format import (  # noqa: F401 - the format, re-exported for callers
    FORMAT_VERSION,
    KEY_FILE,
    MANIFEST,
    TAG_RE,
    TRUST_ENV,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointSaveError,
    CheckpointUntrustedError,
    Found,
    _canonical,
    _check_signature,
    _key_path,
    ckpt_root,
    committed_tags,
    find_resumable,
    load_rng,
    manifest_key,
    read_latest,
    safe_tag_dir,
    sign_manifest,
    step_of,
    tag_for,
    verify,
)
from gpt_dist.parallel import ParallelContext
from gpt_dist.training.hooks import NO_HOOKS, TrainHooks
from gpt_dist.utils import atomic_write_text, sha256_file

ExtraState = Callable[[Path, Callable[[Path, Callable[[Path], None], Any], None]], dict[str, Any]]

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
    out: dict[str, dict[str, Any]] = {}
    for part in ctx.all_gather_objects(mine):
        out.update(part)
    return out


def save(engine: Any, ctx: ParallelContext, run_dir: Path, step: int, client_state: dict[str, Any],
         extra_manifest: dict[str, Any], rng_state: dict[str, Any], keep_last: int,
         on_disk_full: str = "fail", hooks: TrainHooks = NO_HOOKS,
         extra_state: ExtraState | None = None) -> Path | None:
    """Save, verify and commit ``global_step{step}``; returns its path (None if dropped).

    ``extra_state(tag_dir, write)`` (every rank; may be collective) writes more files into the
    checkpoint through ``write(path, write_fn, state)`` (the same error handling as
    DeepSpeed's files) and returns a manifest section: the layout-free state of
    ``training/reshard.py``, under the manifest key ``layout_free``."""
    root = ckpt_root(run_dir)
    tag = tag_for(step)
    tag_dir = root / tag
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # an uncommitted leftover of a crashed save of this step
            shutil.rmtree(tag_dir)
    ctx.barrier()
    errors: list[BaseException] = []

    def guarded(save_file: Any, state_dict: Any, path: str) -> Any:
        # A failed write is recorded, not raised, so DeepSpeed still reaches its own final
        # barrier on this rank; the ranks then agree on the outcome below (never a hang).
        try:
            hooks.on_checkpoint_write(step, ctx.rank, Path(path), state_dict)
            return save_file(state_dict, path)
        except (OSError, RuntimeError) as exc:  # ENOSPC is a RuntimeError from torch.save
            errors.append(exc)
            return None

    try:
        with deepspeed_compat.checkpoint_writes_through(engine, guarded):
            engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as exc:
        errors.append(exc)
    if not errors:
        try:
            rng_path = tag_dir / f"rng_rank_{ctx.rank:05d}.pt"
            hooks.on_checkpoint_write(step, ctx.rank, rng_path, rng_state)
            torch.save(rng_state, rng_path)
        except (OSError, RuntimeError) as exc:
            errors.append(exc)
    section: dict[str, Any] | None = None
    if extra_state is not None:  # collective: every rank takes part, even after a failed write
        def write(path: Path, write_fn: Any, state: Any) -> None:
            if not errors:  # after a failed write this rank only takes part in the collectives
                guarded(lambda _state, p: write_fn(Path(p)), state, str(path))

        section = extra_state(tag_dir, write)
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
        if section is not None:
            manifest["layout_free"] = section
        manifest = sign_manifest(manifest, manifest_key(root, create=True))  # type: ignore[arg-type]
        atomic_write_text(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
        atomic_write_text(root / "latest", tag)  # the commit point
        _retention(root, keep_last, tag, step, hooks)
    ctx.barrier()
    return tag_dir


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


