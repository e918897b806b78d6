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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt_dist.config import Config
from gpt_dist.parallel import ParallelContext


class _MegatronTokenizerView:
    """The three attributes megatron-core's GPTDataset reads from a tokenizer."""

    def __init__(self, vocab_size: int, eod: int) -> None:
        self.vocab_size = vocab_size
        self.eod = eod
        self.pad = -1  # no padding token: every label is a real token
        # megatron-core serialises the config (tokenizer included) into its cache key
        self.unique_identifiers = {"class": "gpt_dist", "vocab_size": vocab_size, "eod": eod}


def resolve_prefixes(prefixes: list[str]) -> list[str]:
    """Expand ``data/webtext`` to its shards ``data/webtext_00000`` ... (sorted)."""
    out: list[str] = []
    for prefix in prefixes:
        if Path(prefix + ".idx").exists():
            out.append(prefix)
            continue
        shards = sorted(str(p)[: -len(".idx")] for p in Path(prefix).parent.glob(Path(prefix).name + "_*.idx"))
        if not shards:
            raise FileNotFoundError(f"data.prefixes: no shards at {prefix}")
        out.extend(shards)
    return out


def _open_checked(prefix: str, verify_hash: bool) -> None:
    """Integrity checks of the project's shard format before megatron-core reads it."""
    try:
        from gpt_dist.data.indexed import open_indexed
    except ImportError:  # pragma: no cover - data tools not installed yet
        return
    open_indexed(prefix, verify_hash=verify_hash)


def _sidecar_key(prefixes: list[str]) -> str:
    """Cache key part from the shards' recorded lengths/hashes: an edited shard gets a new cache."""
    h = hashlib.sha256()
    for p in prefixes:
        h.update(p.encode())
        for suffix in (".bin", ".idx"):
            f = Path(p + suffix)
            h.update(str(f.stat().st_size).encode() if f.exists() else b"-")
        meta = Path(p + ".meta.json")
        if meta.exists():
            h.update(meta.read_bytes())
    return h.hexdigest()[:16]


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


def build_datasets(cfg: Config, ctx: ParallelContext, vocab_size: int, eod_id: int) -> Datasets:
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    d, t = cfg.data, cfg.training
    prefixes = resolve_prefixes(d.prefixes)
    for p in prefixes:
        _open_checked(p, d.verify_shards)
    cache = Path(d.cache_dir) if d.cache_dir else cfg.run_dir / "data_cache"
    cache = cache / _sidecar_key(prefixes)
    weights: list[float] | None = None
    if d.weights is not None:  # expand per-prefix weights over each prefix's shards
        weights = []
        for prefix, w in zip(d.prefixes, d.weights):
            n = len(resolve_prefixes([prefix]))
            weights += [w / n] * n
    split = _checked_split(d.split, prefixes)
    eval_samples = (t.train_steps // t.eval_interval + 1) * t.eval_steps * t.global_batch_size
    sizes = [t.train_steps * t.global_batch_size, eval_samples, 0]
    ds_cfg = GPTDatasetConfig(
        random_seed=t.seed, sequence_length=d.seq_len, blend=(prefixes, weights), split=split,
        path_to_cache=str(cache), tokenizer=_MegatronTokenizerView(vocab_size, eod_id),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, mmap_bin_files=True,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, lambda: True, ds_cfg).build()
    return Datasets(train=train, valid=valid, eod_id=eod_id)


def micro_batches(dataset: Any, ctx: ParallelContext, cfg: Config, consumed_samples: int,
                  accum: int) -> Iterator[dict[str, torch.Tensor]]:
    """The ``accum`` micro-batches of this rank for the global batch at ``consumed_samples``."""
    mb, dp = cfg.training.micro_batch_size, ctx.dp
    for m in range(accum):
        start = consumed_samples + m * dp * mb + ctx.dp_rank * mb
        items = [dataset[(start + i) % len(dataset)] for i in range(mb)]
        yield {
            "tokens": torch.stack([it["tokens"] for it in items]).to(ctx.device, torch.long),
            "labels": torch.stack([it["labels"] for it in items]).to(ctx.device, torch.long),
            "loss_mask": torch.stack([it["loss_mask"] for it in items]).to(ctx.device),
        }


def sample_ids_digest(ctx: ParallelContext, cfg: Config, consumed: int, accum: int) -> str:
    """sha256 of the global sample ids of one step (logged, to prove resume reads the same)."""
    ids = list(range(consumed, consumed + cfg.training.micro_batch_size * ctx.dp * accum))
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
