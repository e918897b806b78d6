#!/usr/bin/env python
"""Verify token shards and show a few decoded documents.

    python data_tools/inspect_shards.py data/webtext [--num-docs 3] [--tokenizer DIR]

Checks every shard of the prefix (or one shard prefix): .idx header, sizes, pointers and
document indices, .bin length and sha256 against the sidecar, every document ending with
the end-of-document token, and the manifest's shard list and counts. Exits 1 on any
corruption (truncated .bin, edited .idx, missing shard, ...), 0 when all is consistent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gpt_dist.data.indexed import ShardFormatError, list_shards, open_indexed, validate_shard
from gpt_dist.tokenizer import TokenizerError, load_tokenizer

PROG = "inspect_shards"


def _manifest_for(prefix: str) -> tuple[Path | None, dict[str, Any] | None]:
    for candidate in (prefix, prefix.rsplit("_", 1)[0]):
        path = Path(candidate + ".manifest.json")
        if path.exists():
            try:
                return path, json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ShardFormatError(f"{path}: unreadable manifest ({exc})") from None
    return None, None


def _check_eod(prefix: str, info: dict[str, Any]) -> None:
    """Every document (one sequence each) must end with the end-of-document token."""
    eod = (info["sidecar"] or {}).get("eod_id")
    if eod is None or not info["num_sequences"]:
        return
    tokens = np.memmap(prefix + ".bin", mode="r", dtype=np.dtype(info["dtype"]))
    lengths = np.fromfile(prefix + ".idx", dtype=np.int32, count=info["num_sequences"], offset=34)
    ends = np.cumsum(lengths.astype(np.int64)) - 1
    bad = np.flatnonzero(tokens[ends] != eod)
    if len(bad):
        raise ShardFormatError(f"{prefix}.bin: document {int(bad[0])} does not end with the "
                               f"end-of-document token {eod} (check: document boundaries)")


def _check_manifest(path: Path, manifest: dict[str, Any], infos: list[dict[str, Any]]) -> list[str]:
    problems = []
    listed = manifest.get("shards", [])
    if len(listed) != len(infos):
        problems.append(f"{path}: lists {len(listed)} shards, found {len(infos)} (check: shards vs manifest)")
    for entry, info in zip(listed, infos):
        for key in ("num_documents", "num_tokens", "bin_bytes"):
            if entry.get(key) != info[key]:
                problems.append(f"{info['prefix']}: {key} {info[key]} != manifest {entry.get(key)} (check: manifest counts)")
        if entry.get("bin_sha256") != (info["sidecar"] or {}).get("bin_sha256"):
            problems.append(f"{info['prefix']}.meta.json: bin_sha256 differs from the manifest (check: manifest hash)")
    counts = manifest.get("counts", {})
    if not problems and len(listed) == len(infos):
        for key, total in (("documents", sum(i["num_documents"] for i in infos)), ("tokens", sum(i["num_tokens"] for i in infos))):
            if counts.get(key) != total:
                problems.append(f"{path}: counts.{key} {counts.get(key)} != {total} in the shards (check: manifest totals)")
    return problems


def _show_documents(shards: list[str], infos: list[dict[str, Any]], manifest: dict[str, Any] | None,
                    tokenizer: str | None, num_docs: int, max_chars: int) -> list[str]:
    tok_path = tokenizer or (manifest or {}).get("tokenizer", {}).get("path")
    tok = None
    if tok_path:
        try:
            tok = load_tokenizer(tok_path)
        except TokenizerError as exc:
            print(f"  (cannot decode: {exc})")
    fp = (infos[0]["sidecar"] or {}).get("tokenizer_fingerprint")
    if tok is not None and fp and tok.fingerprint != fp:
        return [f"{tok_path}: tokenizer fingerprint {tok.fingerprint[:12]} != shard's {fp[:12]} (check: tokenizer)"]
    ds = open_indexed(shards[0])
    for i in range(min(num_docs, infos[0]["num_documents"])):
        ids = ds.get(i)
        text = tok.decode(ids.tolist()) if tok is not None else " ".join(map(str, ids[:64].tolist()))
        more = "..." if len(text) > max_chars else ""
        print(f"\n--- {Path(shards[0]).name} document {i}: {len(ids)} tokens ---\n{text[:max_chars]}{more}")
    return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", help="output prefix (data/webtext) or one shard prefix (data/webtext_00000)")
    p.add_argument("--num-docs", type=int, default=3, help="documents to decode and print (default 3)")
    p.add_argument("--tokenizer", help="tokenizer to decode with (default: the manifest's)")
    p.add_argument("--no-verify-hash", action="store_true", help="skip the sha256 checks (faster on huge shards)")
    p.add_argument("--max-chars", type=int, default=400, help="characters shown per document")
    args = p.parse_args(argv)
    try:
        shards = list_shards(args.prefix)
        manifest_path, manifest = _manifest_for(args.prefix)
    except ShardFormatError as exc:
        print(f"{PROG}: CORRUPT: {exc}", file=sys.stderr)
        return 1
    problems: list[str] = []
    infos: list[dict[str, Any]] = []
    print(f"{'shard':<28} {'documents':>10} {'tokens':>12} {'dtype':>7} {'bin MB':>9}")
    for s in shards:
        try:
            info = validate_shard(s, verify_hash=not args.no_verify_hash, require_sidecar=True)
            _check_eod(s, info)
        except ShardFormatError as exc:
            problems.append(str(exc))
            print(f"{Path(s).name:<28} CORRUPT")
            continue
        infos.append(info)
        print(f"{Path(s).name:<28} {info['num_documents']:>10,} {info['num_tokens']:>12,} {info['dtype']:>7} "
              f"{info['bin_bytes'] / 1e6:>9.2f}")
    if infos:
        print(f"{'total':<28} {sum(i['num_documents'] for i in infos):>10,} {sum(i['num_tokens'] for i in infos):>12,}")
    whole_output = manifest_path is not None and manifest_path == Path(args.prefix + ".manifest.json")
    if whole_output and manifest is not None and not problems:
        problems += _check_manifest(manifest_path, manifest, infos)
    if not problems and args.num_docs > 0 and infos:
        problems += _show_documents(shards, infos, manifest, args.tokenizer, args.num_docs, args.max_chars)
    for msg in problems:
        print(f"{PROG}: CORRUPT: {msg}", file=sys.stderr)
    if problems:
        return 1
    print(f"\n{PROG}: {len(shards)} shard(s) OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
