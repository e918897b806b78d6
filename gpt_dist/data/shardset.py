"""Which shards a training prefix means, and whether training may read them.

Training names data by prefix (``data.prefixes``). Globbing ``PREFIX_*.idx`` skips a shard
that is missing from the middle of a set without a word, and megatron-core reads token ids
as they are: shards written with another tokenizer, or holding ids the model's embedding
does not have, train silently on the wrong tokens (an id past the embedding fails only
deep in a forward pass, if at all). So a prefix is resolved through what wrote it:

* **A manifest** (``PREFIX.manifest.json``, written by ``data_tools/preprocess.py`` when a
  run completes) lists the shards. Every listed shard must be present, pass
  :func:`gpt_dist.data.indexed.validate_shard` with its sidecar (sizes always, sha256 with
  ``verify_hash``) and agree with the manifest's record of it; a numbered shard
  ``PREFIX_NNNNN`` on disk that the manifest does not list is refused. The manifest gives
  the tokenizer's fingerprint and path, and each shard's largest token id.
* **No manifest** (shards of other Megatron tools, or a single named shard): the old glob,
  each shard still validated; a one-line warning says no manifest guards them. A set
  whose preprocessing never finished (``PREFIX.resume/`` left behind) is refused.

Then :func:`check_tokenizer` compares the recorded fingerprint with the run's tokenizer,
and :func:`check_vocab` each shard's largest id with the model's vocabulary. The largest
id comes from the manifest or the sidecar; shards that do not record it (plain Megatron
shards, or gpt_dist's before the sidecar recorded it) are scanned: one sequential pass
over the ``.bin`` through a memory map, at memory speed, on every rank at every start
(the price of not trusting an unguarded file).

Everything here reads the same files on every rank and decides the same way, before any
collective: a bad data set fails every rank at once, none waits for another at a barrier.
Errors are :class:`DataCheckError` (a ``ValueError``, one line naming the files), which
``launch/pretrain.py`` turns into exit code 1.
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt_dist.data import indexed

MANIFEST_FORMAT = "gpt_dist.preprocess"
_ENTRY_KEYS = ("bin_bytes", "idx_bytes", "bin_sha256", "idx_sha256", "num_documents", "num_tokens")


class DataCheckError(ValueError):
    """Training data that must not be read; the one-line message names the files."""


@dataclass
class ShardSet:
    """One configured prefix, resolved: its shards in order and what their writer recorded."""

    prefix: str
    shards: list[str]
    manifest: Path | None = None
    tokenizer_fingerprint: str | None = None  # recorded by the writer; None: unknown
    tokenizer_path: str | None = None
    source: str = ""  # the file the fingerprint comes from (manifest or sidecar)
    max_token_ids: list[int | None] = field(default_factory=list)
    warning: str | None = None


def manifest_path(prefix: str) -> Path:
    return Path(prefix + ".manifest.json")


def _numbered_on_disk(prefix: str) -> list[str]:
    """``PREFIX_NNNNN`` shard prefixes with an ``.idx`` (the names preprocess writes)."""
    pattern = re.compile(re.escape(Path(prefix).name) + r"_\d{5,}")
    found = glob.glob(glob.escape(prefix) + "_*.idx")
    return sorted(s for s in (f[: -len(".idx")] for f in found) if pattern.fullmatch(Path(s).name))


def _load_manifest(path: Path) -> dict[str, Any]:
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataCheckError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("shards"), list):
        raise DataCheckError(f"{path}: not a gpt_dist preprocess manifest (check: manifest format)")
    for k, e in enumerate(m["shards"]):
        if not isinstance(e, dict) or not isinstance(e.get("prefix"), str) or "/" in e["prefix"]:
            raise DataCheckError(f"{path}: shards[{k}] is not a shard record (check: manifest format)")
    return m


def _from_manifest(prefix: str, path: Path, verify_hash: bool, only: str | None = None) -> ShardSet:
    m = _load_manifest(path)
    folder = path.parent
    listed = [str(folder / e["prefix"]) for e in m["shards"]]
    if not listed:
        raise DataCheckError(f"{path}: lists no shards (check: shards vs manifest)")
    for s in _numbered_on_disk(str(folder / Path(prefix).name)):
        if s not in listed:
            raise DataCheckError(f"{s}.idx: a shard of {prefix} on disk that {path} does not list "
                                 "(left from another run?); remove it or re-run preprocess (check: shards vs manifest)")
    tok = m.get("tokenizer") if isinstance(m.get("tokenizer"), dict) else {}
    fp = tok.get("fingerprint")
    out = ShardSet(prefix, [], path, fp, tok.get("path"), str(path))
    for entry, shard in zip(m["shards"], listed):
        if only is not None and shard != only:
            continue
        for suffix in (".idx", ".bin"):
            if not Path(shard + suffix).is_file():
                raise DataCheckError(f"{shard}{suffix}: missing; {path} lists {len(listed)} shards "
                                     "(deleted or not copied?) (check: shards vs manifest)")
        try:
            info = indexed.validate_shard(shard, verify_hash=verify_hash, require_sidecar=True)
        except indexed.ShardFormatError as exc:
            raise DataCheckError(str(exc)) from None
        side = info["sidecar"]
        for key in _ENTRY_KEYS:
            if key in entry and entry[key] != side.get(key):
                raise DataCheckError(f"{indexed.sidecar_path(shard)}: {key} {side.get(key)} differs from {path}'s "
                                     f"{entry[key]} (a shard of another run?) (check: shard vs manifest)")
        if fp is not None and side.get("tokenizer_fingerprint") not in (None, fp):
            raise DataCheckError(f"{indexed.sidecar_path(shard)}: tokenizer fingerprint "
                                 f"{side.get('tokenizer_fingerprint')} differs from {path}'s {fp} "
                                 "(check: shard vs manifest)")
        out.shards.append(shard)
        out.max_token_ids.append(_max_id(shard, entry.get("max_token_id", side.get("max_token_id")), info))
    return out


def _max_id(shard: str, recorded: Any, info: dict[str, Any]) -> int | None:
    if isinstance(recorded, int):
        return recorded
    if info["num_tokens"] == 0:
        return None
    return indexed.scan_max_token_id(shard)


def _unguarded(prefix: str, shards: list[str], verify_hash: bool, why: str) -> ShardSet:
    """Shards no manifest lists: each validated; fingerprint from sidecars where present."""
    out = ShardSet(prefix, [])
    fps: dict[str, str] = {}
    for shard in shards:
        try:
            info = indexed.validate_shard(shard, verify_hash=verify_hash)
        except indexed.ShardFormatError as exc:
            raise DataCheckError(str(exc)) from None
        side = info["sidecar"] or {}
        if side.get("tokenizer_fingerprint"):
            fps.setdefault(side["tokenizer_fingerprint"], str(indexed.sidecar_path(shard)))
        out.shards.append(shard)
        out.max_token_ids.append(_max_id(shard, side.get("max_token_id"), info))
    if len(fps) > 1:
        a, b = list(fps.items())[:2]
        raise DataCheckError(f"{prefix}: its shards were written by different tokenizers ({a[1]}: {a[0]}, "
                             f"{b[1]}: {b[0]}) (check: tokenizer)")
    if fps:
        out.tokenizer_fingerprint, out.source = next(iter(fps.items()))
    if why:
        out.warning = why
    return out


def resolve(prefix: str, verify_hash: bool = False) -> ShardSet:
    """The shards of one configured prefix, checked (see the module docstring).

    Raises :class:`DataCheckError` (and ``FileNotFoundError`` when nothing is there)."""
    if manifest_path(prefix).is_file():
        return _from_manifest(prefix, manifest_path(prefix), verify_hash)
    if Path(prefix + ".idx").is_file():
        m = re.fullmatch(r"(.+)_\d{5,}", prefix)
        if m and manifest_path(m.group(1)).is_file():  # one shard of a manifest's set
            listed = _from_manifest(prefix, manifest_path(m.group(1)), verify_hash, only=prefix)
            if not listed.shards:
                raise DataCheckError(f"{prefix}.idx: not listed in {manifest_path(m.group(1))} "
                                     "(check: shards vs manifest)")
            return listed
        why = "" if indexed.read_sidecar(prefix) else (f"{prefix}: a shard without a gpt_dist sidecar or manifest: the tokenizer "
                               "that wrote it is unknown and unchecked")
        return _unguarded(prefix, [prefix], verify_hash, why)
    if Path(prefix + ".resume").is_dir():
        raise DataCheckError(f"{prefix}.resume: preprocessing of {prefix} did not finish (no "
                             f"{manifest_path(prefix).name}); re-run the same preprocess command to complete it")
    shards = sorted(f[: -len(".idx")] for f in glob.glob(glob.escape(prefix) + "_*.idx"))
    if not shards:
        raise FileNotFoundError(f"data.prefixes: no shards at {prefix}")
    why = (f"{prefix}: no {manifest_path(prefix).name} guards these {len(shards)} shards (plain Megatron "
           "shards?): a missing shard would go unnoticed" + ("" if any(indexed.read_sidecar(s) for s in shards)
                                                            else ", and so would another tokenizer's"))
    return _unguarded(prefix, shards, verify_hash, why)


def check_tokenizer(sets: list[ShardSet], fingerprint: str, tokenizer_path: str) -> None:
    """Refuse shards whose recorded tokenizer is not the run's."""
    for i, s in enumerate(sets):
        if s.tokenizer_fingerprint is not None and s.tokenizer_fingerprint != fingerprint:
            wrote = f" ({s.tokenizer_path})" if s.tokenizer_path else ""
            raise DataCheckError(
                f"data.prefixes[{i}]: {s.source} records tokenizer fingerprint {s.tokenizer_fingerprint}{wrote}, "
                f"but data.tokenizer {tokenizer_path} has fingerprint {fingerprint}: the shards were written with "
                "another tokenizer; re-run preprocess with data.tokenizer or set data.tokenizer to the one that "
                "wrote them")


def check_vocab(sets: list[ShardSet], vocab_size: int) -> None:
    """Refuse a shard holding a token id the model's embedding does not have."""
    for i, s in enumerate(sets):
        for shard, top in zip(s.shards, s.max_token_ids):
            if top is not None and top >= vocab_size:
                raise DataCheckError(
                    f"data.prefixes[{i}]: {shard}.bin holds token id {top}, not below model.vocab_size "
                    f"{vocab_size}; the shards need a larger vocabulary (another tokenizer's shards?)")
