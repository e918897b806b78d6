"""Training data: megatron-core ``GPTDataset`` via ``BlendedMegatronDatasetBuilder``.

The sample order is fixed by the seed (megatron-core shuffles documents and samples with
its own numpy generators). Which samples a rank reads is a pure function of
``consumed_samples``, so the data position is one integer in the checkpoint and a resumed
run reads exactly the batches the uninterrupted run would have read.

    global batch g (consumed_samples = c):  samples c .. c + G - 1
    micro-batch m of data-parallel rank r:  c + m * (dp * mb) + r * mb  .. + mb - 1
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt_dist.config import DataConfig, ModelConfig, TrainingConfig
from gpt_dist.data.indexed import index_cache_key
from gpt_dist.data.shardset import ShardSet, check_tokenizer, check_vocab, resolve
from gpt_dist.parallel import ParallelContext


class _MegatronTokenizerView:
    """The three attributes megatron-core's GPTDataset reads from a tokenizer."""

    def __init__(self, vocab_size: int, eod: int) -> None:
        self.vocab_size = vocab_size
        self.eod = eod
        self.pad = -1  # no padding token: every label is a real token
        # megatron-core serialises the config (tokenizer included) into its cache key
        self.unique_identifiers = {"class": "gpt_dist", "vocab_size": vocab_size, "eod": eod}


def resolve_prefixes(prefixes: list[str], verify_hash: bool = False) -> list[ShardSet]:
    """Each configured prefix resolved to its shards, through the manifest that wrote them
    where there is one (every listed shard present and intact, no unlisted one), else by
    glob (plain Megatron shards); see :mod:`gpt_dist.data.shardset`."""
    return [resolve(prefix, verify_hash=verify_hash) for prefix in prefixes]


def check_data(data: DataConfig, model: ModelConfig, tokenizer_fingerprint: str) -> list[ShardSet]:
    """Resolve and check ``data.prefixes`` before anything reads them: shards present and
    intact, written by the run's tokenizer, every token id below ``model.vocab_size``.

    Deterministic and local (the same files, the same decision on every rank), so a bad
    data set fails every rank before the first collective instead of leaving some waiting.
    Raises ``DataCheckError`` (a ``ValueError``: ``launch/pretrain.py`` exits 1 with the
    line) or ``FileNotFoundError``."""
    sets = resolve_prefixes(data.prefixes, data.verify_shards)
    check_tokenizer(sets, tokenizer_fingerprint, data.tokenizer)
    check_vocab(sets, model.vocab_size)
    return sets


class IndexCacheError(RuntimeError):
    """A sample-index cache file that must not be loaded; the message names the file."""


def check_cache_files(cache: Path) -> None:
    """Refuse cache ``.npy`` files that hold Python objects or are truncated.

    megatron-core's ``GPTDataset`` loads its index caches with ``numpy.load(...,
    allow_pickle=True, mmap_mode="r")``: only numpy's refusal to memory-map object arrays
    stands between a planted file and unpickling, and a truncated or retyped file fails
    deep inside numpy or yields wrong samples. Reading the header ourselves (never the
    payload) and accepting only integer arrays whose file size matches the header is the
    ``allow_pickle=False`` check megatron-core lacks, with an error that names the file."""
    import numpy as np

    for f in sorted(cache.glob("*.npy")):
        with open(f, "rb") as fh:
            try:
                version = np.lib.format.read_magic(fh)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(fh)
            except ValueError as exc:
                raise IndexCacheError(f"{f}: not a numpy index file ({exc}); delete {cache} to rebuild it") from None
            if dtype.hasobject or dtype.kind not in "iu":
                raise IndexCacheError(f"{f}: index cache holds dtype {dtype} (only integer arrays are "
                                      f"loaded, never pickled objects); delete {cache} to rebuild it")
            want = fh.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if f.stat().st_size != want:
            raise IndexCacheError(f"{f}: {f.stat().st_size} bytes, its header implies {want}; "
                                  f"delete {cache} to rebuild it")


def _build_with_cache(ctx: ParallelContext, cache: Path, build: Any) -> Any:
    """Run ``build(path_to_cache)`` so that the cache directory appears whole or not at all.

    megatron-core writes its ``.npy`` indexes in place (rank 0, then a barrier): a crash
    mid-write leaves files that the next run takes for a cache hit, and two jobs sharing a
    cache directory write the same files at once (Megatron-DeepSpeed #356, Megatron-LM
    #907). Here a missing cache is built in a private ``KEY.building-TOKEN`` directory and
    renamed to ``KEY`` (atomic) once every rank has loaded it; if another job published
    ``KEY`` first, ours is dropped (same key, same content). Left-over ``.building-*``
    directories of crashed runs are never read."""
    token = ctx.broadcast_object(None if cache.is_dir() else os.urandom(6).hex())
    if token is None:
        check_cache_files(cache)
        return build(str(cache))
    tmp = cache.with_name(f"{cache.name}.building-{token}")
    out = build(str(tmp))  # every rank has loaded (mmap) its arrays when this returns
    ctx.barrier()
    if ctx.rank == 0:
        try:
            os.rename(tmp, cache)
        except OSError:  # published meanwhile by another job: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _checked_split(split: str, prefixes: list[str]) -> str:
    """The split megatron-core gets: train and valid must hold documents in every shard
    (megatron-core loops forever on an empty split that is asked for samples); an empty
    test split (tiny corpora) is dropped."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    parts = [float(x) for x in split.split(",")]
    total = sum(parts)
    bounds = [sum(parts[:i]) / total for i in range(4)]
    for prefix in prefixes:
        n = len(IndexedDataset(prefix, mmap=True).document_indices) - 1
        docs = [round(bounds[i + 1] * n) - round(bounds[i] * n) for i in range(3)]
        for i, name in enumerate(("train", "valid")):
            if parts[i] > 0 and docs[i] == 0 or (i == 0 and parts[i] == 0):
                raise ValueError(f"data.split: the {name} split of {prefix} ({n} documents) is "
                                 f"empty with split {split!r}; give it a larger share")
        if parts[2] > 0 and docs[2] == 0:
            parts[2] = 0.0
    return ",".join(f"{x:g}" for x in parts)


@dataclass
class Datasets:
    train: Any
    valid: Any
    eod_id: int


def build_datasets(data: DataConfig, model: ModelConfig, training: TrainingConfig, run_dir: Path,
                   ctx: ParallelContext, vocab_size: int, eod_id: int, tokenizer_fingerprint: str) -> Datasets:
    """Train and valid datasets of ``data.prefixes`` after :func:`check_data`
    (``tokenizer_fingerprint``: the run's tokenizer's, compared with the shards'). ``model``
    only for that check (ids below ``model.vocab_size``); ``training``: the seed and the sample
    counts; the index cache goes to ``data.cache_dir`` or ``run_dir/data_cache``."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    d, t = data, training
    sets = check_data(data, model, tokenizer_fingerprint)
    if ctx.rank == 0:
        for i, s in enumerate(sets):
            if s.warning:
                print(f"warning: data.prefixes[{i}]: {s.warning}", file=sys.stderr, flush=True)
    prefixes = [shard for s in sets for shard in s.shards]
    weights: list[float] | None = None
    if d.weights is not None:  # expand per-prefix weights over each prefix's shards
        weights = []
        for s, w in zip(sets, d.weights):
            weights += [w / len(s.shards)] * len(s.shards)
    split = _checked_split(d.split, prefixes)
    eval_samples = (t.train_steps // t.eval_interval + 1) * t.eval_steps * t.global_batch_size
    sizes = [t.train_steps * t.global_batch_size, eval_samples, 0]
    # the key covers the shards' content (recorded hashes), seq_len, seed, sample counts and
    # split: an edited shard or a changed setting gets a fresh cache, never a stale one
    key = index_cache_key(prefixes, seq_len=d.seq_len, seed=t.seed, num_samples=sum(sizes), split=split)
    cache = (Path(d.cache_dir) if d.cache_dir else run_dir / "data_cache") / key[:16]
    cache.parent.mkdir(parents=True, exist_ok=True)

    def build(path_to_cache: str) -> tuple[Any, Any]:
        ds_cfg = GPTDatasetConfig(
            random_seed=t.seed, sequence_length=d.seq_len, blend=(prefixes, weights), split=split,
            path_to_cache=path_to_cache, tokenizer=_MegatronTokenizerView(vocab_size, eod_id),
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
            create_attention_mask=False, mmap_bin_files=True,
        )
        train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, ds_cfg).build()
        return train, valid

    train, valid = _build_with_cache(ctx, cache, build)
    return Datasets(train=train, valid=valid, eod_id=eod_id)


def micro_batches(dataset: Any, ctx: ParallelContext, training: TrainingConfig, consumed_samples: int,
                  accum: int) -> Iterator[dict[str, torch.Tensor]]:
    """The ``accum`` micro-batches of this rank for the global batch at ``consumed_samples``."""
    mb, dp = training.micro_batch_size, ctx.dp
    for m in range(accum):
        start = consumed_samples + m * dp * mb + ctx.dp_rank * mb
        items = [dataset[(start + i) % len(dataset)] for i in range(mb)]
        yield {
            "tokens": torch.stack([it["tokens"] for it in items]).to(ctx.device, torch.long),
            "labels": torch.stack([it["labels"] for it in items]).to(ctx.device, torch.long),
            "loss_mask": torch.stack([it["loss_mask"] for it in items]).to(ctx.device),
        }


def sample_ids_digest(ctx: ParallelContext, training: TrainingConfig, consumed: int, accum: int) -> str:
    """sha256 of the global sample ids of one step (logged, to prove resume reads the same)."""
    ids = list(range(consumed, consumed + training.micro_batch_size * ctx.dp * accum))
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
