"""Batches for fine-tuning: padding, epoch order and the data-parallel split.

Why padding on the right with no attention mask: attention is causal, so a real token
never attends to the pads that follow it, and every sequence keeps positions 0..len-1
exactly as in pretraining; the pads only need to be masked out of the losses
(``lm_mask``) and never read by the head (``extract_pos``).

Why tensors only: DeepSpeed's pipeline engine moves batches between stages as tensors
(``(inputs, labels)`` tuples of tensors); the number of sequences per example K is
therefore not stored but recovered as ``tokens.shape[0] // task_labels.shape[0]``
(:func:`num_choices`).

Why the order is computed rather than drawn from a stateful sampler: the order of an
epoch is a pure function of ``(seed, epoch)`` and the position inside it is one integer
(the batch index), so a resumed run continues with exactly the batches the uninterrupted
run would have seen, from nothing but the global step in the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from gpt_dist.finetune.tasks import Example

_U64 = np.uint64
_MASK64 = (1 << 64) - 1


def collate(examples: Sequence[Example | None], pad_id: int, max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a batch of examples into tensors (K sequences per example, flattened example-major).

    Returns ``tokens`` long [B*K, S]; ``lm_labels`` long [B*K, S], the next token (``tokens``
    shifted left, ``pad_id`` where there is none); ``lm_mask`` float [B*K, S], 1 where
    ``lm_labels`` is a real next token of the sequence (so 0 on the last real position and
    on padding; the start token is never a target, the delimiter and extract are, as in
    GPT-1's reference code); ``extract_pos`` long [B*K], ``len - 1``; ``task_labels`` [B],
    long for classes, float32 for regression (any float label); ``task_mask`` float [B],
    0 for placeholder rows (whose label is 0, a valid class/score, so that a loss weighted by
    ``task_mask`` stays finite; nan or ``tasks.NO_LABEL`` would poison it).

    ``S`` is the longest sequence of the batch, or exactly ``max_len`` when given (fixed
    shapes, for a pipeline engine that keeps the activation shape of its first batch).
    ``None`` entries are placeholders, e.g. from :func:`shard_for_rank`'s padding: they get
    a copy of the first real example with every mask 0, so all
    ranks run the same number of equal micro-batches (ZeRO-3 and the pipeline need that).
    """
    real = [ex for ex in examples if ex is not None]
    if not real:
        raise ValueError("collate: a batch needs at least one real example")
    k = len(real[0].sequences)
    if any(len(ex.sequences) != k for ex in real):
        raise ValueError(f"collate: examples with different numbers of sequences ({sorted({len(e.sequences) for e in real})})")
    regression = any(isinstance(ex.label, float) for ex in real)
    rows = [ex or real[0] for ex in examples]
    seqs = [s for ex in rows for s in ex.sequences]
    longest = max(len(s) for s in seqs)
    if max_len is not None and longest > max_len:
        raise ValueError(f"collate: a sequence of {longest} tokens exceeds max_len {max_len}")
    width = longest if max_len is None else max_len
    tokens = np.full((len(seqs), width), pad_id, dtype=np.int64)
    lm_labels = tokens.copy()
    lm_mask = np.zeros((len(seqs), width), dtype=np.float32)
    for r, s in enumerate(seqs):
        tokens[r, :len(s)] = s
        lm_labels[r, :len(s) - 1] = s[1:]
        lm_mask[r, :len(s) - 1] = 1.0
    task_mask = np.asarray([ex is not None for ex in examples], dtype=np.float32)
    lm_mask *= np.repeat(task_mask, k)[:, None]
    labels = [0 if ex is None else ex.label for ex in examples]
    return {"tokens": torch.from_numpy(tokens), "lm_labels": torch.from_numpy(lm_labels),
            "lm_mask": torch.from_numpy(lm_mask),
            "extract_pos": torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long),
            "task_labels": torch.tensor(labels, dtype=torch.float32 if regression else torch.long),
            "task_mask": torch.from_numpy(task_mask)}


def num_choices(batch: dict[str, torch.Tensor]) -> int:
    """K, the sequences per example of a collated batch."""
    return batch["tokens"].shape[0] // batch["task_labels"].shape[0]


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 (Steele et al. 2014), vectorised: a fixed integer hash, written here
    because numpy's and torch's shuffles promise no stream stability across versions, and
    a resume after an upgrade must still see the same order."""
    with np.errstate(over="ignore"):
        z = x + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def _permutation(n: int, seed: int, epoch: int, stream: int = 0) -> np.ndarray:
    """A permutation of ``range(n)`` that depends only on (seed, epoch, stream)."""
    salt = _splitmix64(np.array([(seed & _MASK64)], dtype=_U64))
    salt = _splitmix64(salt ^ _U64(epoch & _MASK64))
    salt = _splitmix64(salt ^ _U64(stream))
    keys = _splitmix64(np.arange(n, dtype=_U64) ^ salt)
    return np.argsort(keys, kind="stable")


class EpochSampler:
    """Global batches of example indices, in an order fixed by (seed, epoch).

    ``shuffle=False`` keeps file order (evaluation). ``drop_last=True`` (training) drops
    the ``n % global_batch_size`` examples that fall last in this epoch's order, so every
    step has the same size (and the same learning-rate meaning); which ones are dropped
    changes with the epoch. ``drop_last=False`` (evaluation) keeps a short last batch.

    Length bucketing (``lengths`` and ``bucket > 1``): after shuffling, each window of
    ``bucket`` batches is sorted by length (stable) and cut into batches, and the batch
    order is then shuffled again, all from (seed, epoch); batches pad less while their
    composition stays random. Without it, batches are consecutive runs of the order.
    """

    def __init__(self, n_examples: int, global_batch_size: int, seed: int, *, shuffle: bool = True,
                 drop_last: bool = True, lengths: Sequence[int] | None = None, bucket: int = 1) -> None:
        if n_examples < 1 or global_batch_size < 1:
            raise ValueError(f"EpochSampler: need n_examples >= 1 and global_batch_size >= 1, "
                             f"got {n_examples} and {global_batch_size}")
        if drop_last and global_batch_size > n_examples:
            raise ValueError(f"global batch size {global_batch_size} exceeds the {n_examples} examples "
                             "of the task (an epoch would have no step)")
        if lengths is not None and len(lengths) != n_examples:
            raise ValueError(f"EpochSampler: {len(lengths)} lengths for {n_examples} examples")
        if bucket < 1:
            raise ValueError(f"EpochSampler: bucket must be >= 1, got {bucket}")
        self.n, self.batch_size, self.seed = n_examples, global_batch_size, seed
        self.shuffle, self.drop_last, self.bucket = shuffle, drop_last, bucket
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def batches_for(self, epoch: int) -> list[list[int]]:
        """All the global batches of ``epoch``, in order."""
        order = _permutation(self.n, self.seed, epoch) if self.shuffle else np.arange(self.n)
        if self.drop_last:
            order = order[:self.steps_per_epoch * self.batch_size]
        bs = self.batch_size
        if self.lengths is None or self.bucket <= 1:
            return [order[i:i + bs].tolist() for i in range(0, len(order), bs)]
        window = self.bucket * bs
        batches: list[list[int]] = []
        for w in range(0, len(order), window):
            part = order[w:w + window]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[i:i + bs].tolist() for i in range(0, len(part), bs)]
        if self.shuffle:
            batches = [batches[i] for i in _permutation(len(batches), self.seed, epoch, stream=1)]
        if not self.drop_last and len(batches) > 1:  # keep the short batch last, as documented
            short = [b for b in batches if len(b) < bs]
            batches = [b for b in batches if len(b) == bs] + short
        return batches

    def to_global_step(self, epoch: int, index: int) -> int:
        """The step count before batch ``index`` of ``epoch``."""
        if not 0 <= index < self.steps_per_epoch:
            raise ValueError(f"batch index {index} outside 0..{self.steps_per_epoch - 1}")
        return epoch * self.steps_per_epoch + index

    def position(self, global_step: int) -> tuple[int, int]:
        """(epoch, batch index) of the batch that step ``global_step`` (0-based) trains on."""
        if global_step < 0:
            raise ValueError(f"global step {global_step} < 0")
        epoch, index = divmod(global_step, self.steps_per_epoch)
        return epoch, index

    def batch_at(self, global_step: int) -> list[int]:
        """The global batch of step ``global_step``: what a resumed run reads next."""
        epoch, index = self.position(global_step)
        return self.batches_for(epoch)[index]


def shard_for_rank(global_batch_indices: Sequence[int], dp_rank: int, dp_size: int, micro_batch_size: int, *,
                   pad_value: int | None = None) -> list[list[int]]:
    """The micro-batches of data-parallel rank ``dp_rank`` for one global batch.

    The split is pretraining's (``training/data.py`` ``micro_batches``): micro-batch ``m``
    of rank ``r`` holds ``batch[m*dp*mb + r*mb : m*dp*mb + (r+1)*mb]``. A batch must be
    ``accum * dp_size * micro_batch_size`` long; with ``pad_value`` (evaluation's short
    last batch) it is first padded with ``pad_value`` to the next such multiple, so every
    rank gets the same number of full micro-batches (:func:`collate` takes ``None`` for
    the padding entries).
    """
    if not 0 <= dp_rank < dp_size or micro_batch_size < 1:
        raise ValueError(f"shard_for_rank: bad dp_rank {dp_rank} / dp_size {dp_size} / micro_batch_size "
                         f"{micro_batch_size}")
    per_step = dp_size * micro_batch_size
    batch = list(global_batch_indices)
    if len(batch) % per_step:
        if pad_value is None:
            raise ValueError(f"a global batch of {len(batch)} is not a multiple of dp_size {dp_size} x "
                             f"micro_batch_size {micro_batch_size}")
        batch += [pad_value] * (per_step - len(batch) % per_step)
    return [batch[m + dp_rank * micro_batch_size:m + (dp_rank + 1) * micro_batch_size]
            for m in range(0, len(batch), per_step)]
