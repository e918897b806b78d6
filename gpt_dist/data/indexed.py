"""The project's one token-shard format: Megatron ``.bin``/``.idx`` plus a sidecar.

A shard ``PREFIX_00000`` is three files::

    PREFIX_00000.bin        tokens, uint16 (vocabulary < 65,500) or int32, one sequence
                            per document, each ending with the end-of-document token
    PREFIX_00000.idx        megatron-core's index, byte for byte what its
                            IndexedDatasetBuilder writes (written here without importing
                            it, see ShardWriter): magic MMIDIDX, version 1, dtype code,
                            sequence and document counts, int32 lengths, int64 byte
                            pointers, int64 document_indices
    PREFIX_00000.meta.json  the sidecar: .bin/.idx byte lengths and sha256, dtype,
                            counts, largest token id, tokenizer fingerprint

Why the sidecar: megatron-core 0.16.1 does not tie an ``.idx`` to its ``.bin``. A
``.bin`` truncated by a few tokens opens fine and fails on the last document; a larger
``.bin`` from another shard opens fine and silently returns wrong tokens; and its header
checks are ``assert`` statements that ``python -O`` removes. :func:`open_indexed`
checks everything before megatron-core sees the files, with plain ``if``/``raise``.

Writes are atomic: each file goes to ``NAME.tmp``, is fsynced and renamed; the ``.idx``
is renamed last, so a shard is visible (to :func:`list_shards` and to megatron-core)
only when its ``.bin`` and sidecar are complete.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gpt_dist import utils
from gpt_dist.utils import fsync_dir, sha256_file

if TYPE_CHECKING:  # megatron-core imports torch: keep it out of light-weight callers
    from megatron.core.datasets.indexed_dataset import IndexedDataset

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8
SIDECAR_FORMAT = "gpt_dist.shard"
SIDECAR_VERSION = 1
TMP = ".tmp"
# megatron-core's DType codes; floats (6, 7) are not token types
TOKEN_DTYPES: dict[int, type[np.integer]] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
                                             5: np.int64, 8: np.uint16}
_SHARD_RE = re.compile(r"_(\d{5,})$")


class ShardFormatError(ValueError):
    """A shard failed an integrity check; the message names the file and the check."""


def token_dtype(vocab_size: int) -> type[np.integer]:
    """uint16 when every id fits (megatron-core's own cut-off, 65,500), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def shard_prefix(prefix: str, index: int) -> str:
    return f"{prefix}_{index:05d}"


def sidecar_path(prefix: str) -> Path:
    return Path(prefix + ".meta.json")


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """The shard format's JSON (indent 1, sorted keys), through ``gpt_dist.utils``' one
    atomic-write rule: readers see the old file or the new one."""
    utils.atomic_write_json(path, obj, indent=1, sort_keys=True)


class ShardWriter:
    """Writes one shard in megatron-core's ``.bin``/``.idx`` format to ``.tmp`` names;
    :meth:`finalize` writes the index, fsyncs and writes the sidecar, :meth:`commit` renames.

    Why by hand and not through megatron-core's ``IndexedDatasetBuilder``: importing
    ``megatron.core.datasets.indexed_dataset`` runs megatron-core's package ``__init__``
    (torch, its optimizer, FSDP, transformer config...), about 5 s before preprocessing
    reads a byte, for a format that is a 34-byte header and three numpy arrays. The bytes
    are the builder's, exactly (tests/data_tools/test_format.py writes the same documents
    both ways and compares, then reads ours back with megatron-core's ``IndexedDataset``
    and ``GPTDataset``): megatron-core stays the reader and the reference.
    """

    def __init__(self, prefix: str, vocab_size: int, eod_id: int, tokenizer_fingerprint: str,
                 extra: dict[str, Any] | None = None, dtype: type[np.integer] | None = None) -> None:
        self.prefix = prefix
        self.dtype = dtype or token_dtype(vocab_size)
        self.meta: dict[str, Any] = {"vocab_size": vocab_size, "eod_id": eod_id,
                                     "tokenizer_fingerprint": tokenizer_fingerprint, **(extra or {})}
        self.num_documents = 0
        self.num_tokens = 0
        self._lengths: list[int] = []  # one per sequence
        self._doc_idx: list[int] = [0]  # sequence index where each document ends
        self._sha = hashlib.sha256()
        self._bin = open(prefix + ".bin" + TMP, "wb")  # noqa: SIM115 - closed in finalize/abort
        self._finalized = False

    def _append(self, buf: bytes | memoryview) -> None:
        self._bin.write(buf)
        self._sha.update(buf)

    def add_document(self, tokens: np.ndarray) -> None:
        """Append one document (its end-of-document token already included) as one sequence."""
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:  # a cast must not wrap ids around (megatron-core's builder does)
            info = np.iinfo(self.dtype)
            if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
                raise ShardFormatError(f"{self.prefix}.bin: token id outside {np.dtype(self.dtype).name} "
                                       "(check: token dtype)")
            arr = arr.astype(self.dtype)
        arr = np.ascontiguousarray(arr)
        if arr.size:
            self._append(memoryview(arr).cast("B"))
        self._lengths.append(int(arr.size))
        self._doc_idx.append(len(self._lengths))
        self.num_documents += 1
        self.num_tokens += int(arr.size)

    def add_shard(self, prefix: str, info: dict[str, Any]) -> None:
        """Append every document of a validated shard (``info`` from :func:`validate_shard`):
        megatron-core's ``add_index``, with its dtype ``assert`` as a real check."""
        if np.dtype(info["dtype"]) != np.dtype(self.dtype):
            raise ShardFormatError(f"{prefix}.idx: dtype {info['dtype']} != {np.dtype(self.dtype).name} "
                                   "(check: merge dtype)")
        lengths, doc_idx = read_index_arrays(prefix)
        offset = len(self._lengths)
        self._lengths.extend(int(x) for x in lengths)
        self._doc_idx.extend(int(x) + offset for x in doc_idx[1:])
        with open(prefix + ".bin", "rb") as f:
            while chunk := f.read(1 << 22):
                self._append(chunk)
        self.num_documents += len(doc_idx) - 1
        self.num_tokens += int(lengths.sum(dtype=np.int64))

    def _index_bytes(self) -> bytes:
        """The ``.idx`` as megatron-core's ``_IndexWriter`` writes it (multimodal=False: no modes)."""
        code = {v: k for k, v in TOKEN_DTYPES.items()}[self.dtype]
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(self.dtype).itemsize, out=pointers[1:])
        doc_idx = np.asarray(self._doc_idx, dtype=np.int64)
        header = INDEX_MAGIC + struct.pack("<Q", INDEX_VERSION) + struct.pack("<B", code)
        header += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_idx))
        return header + lengths.tobytes() + pointers.tobytes() + doc_idx.tobytes()

    def finalize(self) -> dict[str, Any]:
        """Write the index and the sidecar (all still ``.tmp``); returns the sidecar."""
        bin_tmp, idx_tmp = self.prefix + ".bin" + TMP, self.prefix + ".idx" + TMP
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        idx = self._index_bytes()
        # one vectorised pass over what was written (page cache), not a max per document
        top = _max_of_file(bin_tmp, self.dtype) if self.num_tokens else None
        with open(idx_tmp, "wb") as f:
            f.write(idx)
            f.flush()
            os.fsync(f.fileno())
        code = {v: k for k, v in TOKEN_DTYPES.items()}[self.dtype]
        self.meta.update({
            "format": SIDECAR_FORMAT, "version": SIDECAR_VERSION,
            "dtype": np.dtype(self.dtype).name, "dtype_code": code,
            "bin_bytes": os.path.getsize(bin_tmp), "bin_sha256": self._sha.hexdigest(),
            "idx_bytes": len(idx), "idx_sha256": hashlib.sha256(idx).hexdigest(),
            "num_sequences": len(self._lengths), "num_documents": self.num_documents,
            "num_tokens": self.num_tokens,
            "max_token_id": top,  # None for an empty shard: no token to bound
        })
        atomic_write_json(str(sidecar_path(self.prefix)) + TMP, self.meta)
        self._finalized = True
        return self.meta

    def commit(self) -> None:
        """Rename ``.bin``, sidecar, then ``.idx`` (the shard becomes visible last)."""
        if not self._finalized:
            raise RuntimeError("finalize() before commit()")
        os.replace(self.prefix + ".bin" + TMP, self.prefix + ".bin")
        os.replace(str(sidecar_path(self.prefix)) + TMP, sidecar_path(self.prefix))
        os.replace(self.prefix + ".idx" + TMP, self.prefix + ".idx")
        fsync_dir(Path(self.prefix).parent)

    def abort(self) -> None:
        """Drop the temporary files of an unfinished shard."""
        try:
            self._bin.close()
        except (AttributeError, OSError):
            pass
        remove_shard_files(self.prefix, committed=False)


def remove_shard_files(prefix: str, committed: bool = True) -> None:
    """Delete a shard's temporary files (and its final files when ``committed``)."""
    names = [prefix + ".bin", prefix + ".idx", str(sidecar_path(prefix))]
    # and atomic_path's unique temporaries of a write that died: .NAME.XXXX.tmp
    strays = glob.glob(os.path.join(glob.escape(os.path.dirname(prefix) or "."),
                                    "." + glob.escape(os.path.basename(prefix)) + ".*.tmp"))
    for name in names:
        for path in ([name + TMP] + ([name] if committed else [])):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
    for path in strays:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def read_sidecar(prefix: str) -> dict[str, Any] | None:
    """The shard's sidecar, None when there is none; ShardFormatError when unreadable."""
    path = sidecar_path(prefix)
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ShardFormatError(f"{path}: unreadable sidecar ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise ShardFormatError(f"{path}: not a gpt_dist shard sidecar (check: sidecar format)")
    return meta


def _fail(path: str, check: str, detail: str) -> ShardFormatError:
    return ShardFormatError(f"{path}: {detail} (check: {check})")


def validate_shard(prefix: str, verify_hash: bool = False, require_sidecar: bool = False) -> dict[str, Any]:
    """Check a shard without megatron-core; returns a summary. Raises ShardFormatError.

    Checks, in order: files present; ``.idx`` header (magic, version, dtype code);
    ``.idx`` size equals what its counts imply; lengths non-negative; pointers start at 0
    and are contiguous (so they cannot overlap); ``document_indices`` start at 0, never
    decrease and end at the sequence count; the ``.bin`` size equals what the index
    implies; and against the sidecar: ``.bin``/``.idx`` sizes, dtype and counts, and with
    ``verify_hash`` the sha256 of both files. No ``assert``: all of it runs under -O.
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise _fail(path, "files present", "missing")
    meta = read_sidecar(prefix)
    if meta is None and require_sidecar:
        raise _fail(str(sidecar_path(prefix)), "sidecar present", "missing")
    idx_size, bin_size = os.path.getsize(idx_path), os.path.getsize(bin_path)
    if idx_size < HEADER_BYTES:
        raise _fail(idx_path, "idx header", f"{idx_size} bytes, shorter than the {HEADER_BYTES}-byte header")
    with open(idx_path, "rb") as f:
        header = f.read(HEADER_BYTES)
    if header[:9] != INDEX_MAGIC:
        raise _fail(idx_path, "idx magic", f"bad magic {header[:9]!r}")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[9:])
    if version != INDEX_VERSION:
        raise _fail(idx_path, "idx version", f"unsupported version {version}")
    if code not in TOKEN_DTYPES:
        raise _fail(idx_path, "dtype code", f"dtype code {code} is not an integer token type")
    dtype = TOKEN_DTYPES[code]
    itemsize = np.dtype(dtype).itemsize
    expected_idx = HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
    if n_doc < 1 or idx_size != expected_idx:
        raise _fail(idx_path, "idx size", f"{idx_size} bytes, but {n_seq} sequences and {n_doc} "
                    f"document indices imply {expected_idx} (truncated or extended)")
    mm = np.memmap(idx_path, mode="r", dtype=np.uint8)
    try:
        lengths = np.frombuffer(mm, dtype=np.int32, count=n_seq, offset=HEADER_BYTES)
        pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=HEADER_BYTES + 4 * n_seq)
        doc_idx = np.frombuffer(mm, dtype=np.int64, count=n_doc, offset=HEADER_BYTES + 12 * n_seq)
        if n_seq and int(lengths.min()) < 0:
            raise _fail(idx_path, "sequence lengths", "negative sequence length")
        ends = np.cumsum(lengths.astype(np.int64) * itemsize)
        if n_seq and (pointers[0] != 0 or not np.array_equal(pointers[1:], ends[:-1])):
            raise _fail(idx_path, "pointers", "sequence pointers are not contiguous (overlap or gap)")
        if doc_idx[0] != 0 or (n_doc > 1 and bool((np.diff(doc_idx) < 0).any())):
            raise _fail(idx_path, "document_indices", "document_indices do not start at 0 or decrease")
        if int(doc_idx[-1]) != n_seq:
            raise _fail(idx_path, "document_indices", f"last document index {int(doc_idx[-1])} != {n_seq} sequences")
        implied_bin = int(ends[-1]) if n_seq else 0
        num_tokens = implied_bin // itemsize
    finally:
        del mm
    if bin_size != implied_bin:
        raise _fail(bin_path, "bin size", f"{bin_size} bytes, but the index implies {implied_bin}")
    if meta is not None:
        _check_sidecar(prefix, meta, idx_size, bin_size, np.dtype(dtype).name, n_seq, n_doc - 1, num_tokens)
        if verify_hash:
            for path, key in ((bin_path, "bin_sha256"), (idx_path, "idx_sha256")):
                if sha256_file(path) != meta.get(key):
                    raise _fail(path, "sha256", "content differs from the sha256 in the sidecar")
    return {"prefix": prefix, "dtype": np.dtype(dtype).name, "num_sequences": n_seq,
            "num_documents": n_doc - 1, "num_tokens": num_tokens, "bin_bytes": bin_size,
            "idx_bytes": idx_size, "sidecar": meta}


def _check_sidecar(prefix: str, meta: dict[str, Any], idx_size: int, bin_size: int, dtype: str,
                   n_seq: int, n_docs: int, n_tokens: int) -> None:
    checks = (("bin_bytes", bin_size, prefix + ".bin", "bin size vs sidecar"),
              ("idx_bytes", idx_size, prefix + ".idx", "idx size vs sidecar"),
              ("dtype", dtype, prefix + ".idx", "dtype vs sidecar"),
              ("num_sequences", n_seq, prefix + ".idx", "counts vs sidecar"),
              ("num_documents", n_docs, prefix + ".idx", "counts vs sidecar"),
              ("num_tokens", n_tokens, prefix + ".idx", "counts vs sidecar"))
    for key, actual, path, check in checks:
        if meta.get(key) != actual:
            raise _fail(path, check, f"{key} is {actual}, the sidecar records {meta.get(key)}")


def open_indexed(prefix: str, verify_hash: bool = False, require_sidecar: bool = False) -> IndexedDataset:
    """megatron-core's ``IndexedDataset`` for ``prefix``, after :func:`validate_shard`.

    Shards written by gpt_dist always have a sidecar; shards from other Megatron tools
    may not, and then get every check except the sidecar ones unless ``require_sidecar``.
    """
    validate_shard(prefix, verify_hash=verify_hash, require_sidecar=require_sidecar)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix, multimodal=False, mmap=True)


def list_shards(prefix_or_glob: str) -> list[str]:
    """Shard prefixes of ``data/webtext`` (``data/webtext_00000``, ...), of a glob, or of
    one shard prefix. Numbered shards must be contiguous from 00000, and as many as the
    manifest (``PREFIX.manifest.json``) lists when there is one."""
    p = str(prefix_or_glob)
    if os.path.isfile(p + ".idx"):
        return [p]
    if glob.has_magic(p):
        found = sorted(m[: -len(".idx")] for m in glob.glob(p if p.endswith(".idx") else p + ".idx"))
        if not found:
            raise ShardFormatError(f"{p}: no shard matches (check: shards present)")
        return found
    numbered = sorted((int(m.group(1)), s) for s in (x[: -len(".idx")] for x in glob.glob(glob.escape(p) + "_*.idx"))
                      if (m := _SHARD_RE.search(s[len(p):])) and s[len(p):] == m.group(0))
    manifest = Path(p + ".manifest.json")
    expected = None
    if manifest.exists():
        try:
            expected = len(json.loads(manifest.read_text(encoding="utf-8"))["shards"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ShardFormatError(f"{manifest}: unreadable manifest ({exc})") from None
    if not numbered and not expected:
        raise ShardFormatError(f"{p}: no shards ({p}_00000.idx not found) (check: shards present)")
    for want, (have, _) in enumerate(numbered):
        if have != want:
            raise ShardFormatError(f"{shard_prefix(p, want)}.idx: missing (check: shards contiguous)")
    if expected is not None and len(numbered) != expected:
        missing = shard_prefix(p, len(numbered))
        raise ShardFormatError(f"{missing}.idx: missing; the manifest lists {expected} shards, "
                               f"found {len(numbered)} (check: shards vs manifest)")
    return [s for _, s in numbered]


def shard_fingerprint(prefix: str) -> str:
    """Content identity of one shard (sha256 hex): from the sidecar's recorded hashes
    (lengths checked at open, hashes under data.verify_shards). A shard without a sidecar (another Megatron tool's)
    is identified by its ``.idx`` hash and ``.bin`` length, not by hashing a possibly huge
    ``.bin`` at every start: the sample indexes this keys depend only on the document
    lengths in the ``.idx``."""
    meta = read_sidecar(prefix)
    if meta is not None and meta.get("bin_sha256") and meta.get("idx_sha256"):
        parts = f"{meta['bin_sha256']}:{meta['idx_sha256']}"
    else:
        parts = f"{os.path.getsize(prefix + '.bin')}:{sha256_file(prefix + '.idx')}"
    return hashlib.sha256(parts.encode()).hexdigest()


def index_cache_key(prefixes: list[str], seq_len: int, seed: int, num_samples: int, split: str) -> str:
    """Key for derived sample-index caches (``.npy``): any edited shard, or any change of
    sequence length, seed, sample count or split, gives a new key, so a stale cache is
    never reused."""
    payload = {"shards": [shard_fingerprint(p) for p in prefixes], "seq_len": seq_len,
               "seed": seed, "num_samples": num_samples, "split": split}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def read_index_arrays(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(sequence lengths, document indices) of a shard's ``.idx`` (copies; call
    :func:`validate_shard` first: this trusts the header)."""
    with open(prefix + ".idx", "rb") as f:
        header = f.read(HEADER_BYTES)
        _, _, n_seq, n_doc = struct.unpack("<QBQQ", header[9:])
        lengths = np.fromfile(f, dtype=np.int32, count=n_seq)
        f.seek(HEADER_BYTES + 12 * n_seq)
        doc_idx = np.fromfile(f, dtype=np.int64, count=n_doc)
    return lengths, doc_idx


def scan_max_token_id(prefix: str, chunk_tokens: int = 1 << 24) -> int | None:
    """The largest token id in a shard's ``.bin`` (None when it holds no token), read through
    a memory map in chunks: the fallback for shards whose sidecar does not record it
    (other Megatron tools'). One sequential pass at memory speed, bounded memory."""
    info = validate_shard(prefix)
    if info["num_tokens"] == 0:
        return None
    return _max_of_file(prefix + ".bin", np.dtype(info["dtype"]).type, chunk_tokens)


def _max_of_file(path: str, dtype: type[np.integer], chunk_tokens: int = 1 << 24) -> int:
    mm = np.memmap(path, mode="r", dtype=dtype)
    try:
        return max(int(mm[i:i + chunk_tokens].max()) for i in range(0, len(mm), chunk_tokens))
    finally:
        del mm


def merge_shards(prefixes: list[str], out_prefix: str) -> dict[str, Any]:
    """Concatenate shards into one (documents and ``document_indices`` in order).

    All inputs are validated first, and must share dtype and tokenizer fingerprint:
    megatron-core's ``add_index`` only ``assert``s the dtype, which ``-O`` removes, and
    a mixed merge would reinterpret token bytes.
    """
    if not prefixes:
        raise ShardFormatError(f"{out_prefix}: nothing to merge")
    infos = [validate_shard(p) for p in prefixes]
    dtypes = {i["dtype"] for i in infos}
    if len(dtypes) != 1:
        raise ShardFormatError(f"{out_prefix}: cannot merge shards of dtypes {sorted(dtypes)} (check: merge dtype)")
    fps = {(i["sidecar"] or {}).get("tokenizer_fingerprint") for i in infos}
    if len(fps) != 1:
        raise ShardFormatError(f"{out_prefix}: cannot merge shards of different tokenizers (check: merge tokenizer)")
    first = infos[0]["sidecar"] or {}
    writer = ShardWriter(out_prefix, first.get("vocab_size") or 0, first.get("eod_id"),
                         first.get("tokenizer_fingerprint"), {"merged_from": [os.path.basename(p) for p in prefixes]},
                         dtype=np.dtype(infos[0]["dtype"]).type)
    try:
        for p, info in zip(prefixes, infos):
            writer.add_shard(p, info)
        meta = writer.finalize()
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return meta
