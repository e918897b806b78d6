"""The on-disk checkpoint format: where a committed checkpoint is, what makes it committed
(a signed manifest of every file's size and sha256), and how it is found, verified and read.

Below both training (``training/checkpoint.py`` writes checkpoints through DeepSpeed and
resumes from them) and export (``export/reader.py`` reads any layout into whole tensors), so
neither has to import the other to agree on the format. The writing side, its fault
handling and the security model are described in ``training/checkpoint.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt_dist.utils import sha256_file

TAG_RE = re.compile(r"^global_step(\d+)$")
MANIFEST = "manifest.json"
KEY_FILE = ".manifest_key"
TRUST_ENV = "GPT_DIST_TRUST_CHECKPOINT"
FORMAT_VERSION = 1

LAYOUT_FREE_PREFIX = "lf_"
LAYOUT_FREE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")
"""A checkpoint's layout-free state: one ``lf_<GPT-2 name>.safetensors`` per parameter with
these full fp32 tensors, listed in the manifest's ``layout_free`` section (written by
``training/reshard.py``; read by it to resume in another layout and by ``export/reader.py``)."""


def layout_free_file(name: str) -> str:
    return f"{LAYOUT_FREE_PREFIX}{name}.safetensors"


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


def committed_tags(root: Path) -> list[str]:
    """Tags with a manifest, oldest first (uncommitted directories are not checkpoints)."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir()
            if TAG_RE.match(p.name) and not p.is_symlink() and (p / MANIFEST).is_file()]
    return sorted(tags, key=step_of)


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
