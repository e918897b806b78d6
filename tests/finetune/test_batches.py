"""Batching: padding and masks, the epoch order and its resume, the data-parallel split."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gpt_dist.finetune.batches import EpochSampler, _permutation, collate, num_choices, shard_for_rank
from gpt_dist.finetune.tasks import Example

S, D, E, PAD = 2, 3, 4, 0


def ex(*seqs: list[int], label: float = 0) -> Example:
    return Example([np.asarray(s, dtype=np.int32) for s in seqs], label, 1, False)


# ---- collate ----------------------------------------------------------------------------

def test_collate_classification_by_hand():
    batch = collate([ex([S, 10, 11, 12, E], label=1), ex([S, 13, E], label=0)], PAD)
    assert batch["tokens"].tolist() == [[S, 10, 11, 12, E], [S, 13, E, PAD, PAD]]
    assert batch["lm_labels"].tolist() == [[10, 11, 12, E, PAD], [13, E, PAD, PAD, PAD]]
    assert batch["lm_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    assert batch["extract_pos"].tolist() == [4, 2]
    assert batch["task_labels"].tolist() == [1, 0] and batch["task_labels"].dtype == torch.long
    assert batch["task_mask"].tolist() == [1.0, 1.0]
    assert batch["tokens"].dtype == torch.long and batch["lm_mask"].dtype == torch.float32
    assert all(isinstance(v, torch.Tensor) for v in batch.values())
    assert num_choices(batch) == 1


def test_collate_multiple_choice_is_example_major():
    a = ex([S, 10, D, 20, E], [S, 10, D, 21, 22, E], [S, 10, D, E], label=1)
    b = ex([S, 11, D, 23, E], [S, 11, D, 24, E], [S, 11, D, 25, 26, 27, E], label=2)
    batch = collate([a, b], PAD)
    assert batch["tokens"].shape == (6, 7) and num_choices(batch) == 3
    rows = [s.tolist() for e_ in (a, b) for s in e_.sequences]
    for r, seq in enumerate(rows):
        assert batch["tokens"][r, :len(seq)].tolist() == seq and (batch["tokens"][r, len(seq):] == PAD).all()
        assert int(batch["extract_pos"][r]) == len(seq) - 1 and int(batch["tokens"][r, len(seq) - 1]) == E
        m = batch["lm_mask"][r]
        assert m.sum() == len(seq) - 1
        # where the mask is on, the target is the next token of the sequence
        assert (batch["lm_labels"][r][m.bool()] == batch["tokens"][r, 1:len(seq)]).all()
    assert batch["task_labels"].tolist() == [1, 2]


def test_collate_regression_labels_float():
    batch = collate([ex([S, 10, D, 11, E], [S, 11, D, 10, E], label=2.5),
                     ex([S, 12, D, 13, E], [S, 13, D, 12, E], label=0.0)], PAD)
    assert batch["task_labels"].dtype == torch.float32 and batch["task_labels"].tolist() == [2.5, 0.0]
    assert batch["tokens"].shape == (4, 5) and num_choices(batch) == 2


def test_collate_fixed_length_and_errors():
    batch = collate([ex([S, 10, E])], PAD, max_len=8)
    assert batch["tokens"].shape == (1, 8) and batch["lm_mask"].sum() == 2
    with pytest.raises(ValueError, match="exceeds max_len"):
        collate([ex([S, 10, 11, E])], PAD, max_len=3)
    with pytest.raises(ValueError, match="different numbers of sequences"):
        collate([ex([S, E]), ex([S, E], [S, E])], PAD)
    with pytest.raises(ValueError, match="at least one real example"):
        collate([None], PAD)


def test_collate_placeholders_are_masked():
    real = ex([S, 10, 11, E], [S, 12, E], label=1)
    batch = collate([real, None], PAD)
    assert batch["tokens"].shape == (4, 4) and batch["task_mask"].tolist() == [1.0, 0.0]
    assert batch["lm_mask"][2:].sum() == 0 and batch["lm_mask"][:2].sum() == 3 + 2
    assert batch["task_labels"].tolist() == [1, 0]  # a valid label, removed by task_mask


# ---- the epoch order --------------------------------------------------------------------

def test_permutation_is_frozen():
    """The order is part of the checkpoint contract: a resumed run (even with newer numpy or
    torch) must see the same batches, so the permutation may never change silently."""
    assert _permutation(12, 1234, 0).tolist() == [7, 4, 2, 10, 3, 0, 1, 5, 8, 9, 6, 11]
    assert _permutation(12, 1234, 1).tolist() == [0, 8, 5, 4, 1, 11, 2, 6, 10, 9, 7, 3]
    assert EpochSampler(10, 4, 7).batches_for(0) == [[1, 7, 6, 0], [4, 2, 8, 3]]


def test_permutation_looks_random():
    n = 20000
    p = _permutation(n, 3, 5)
    assert sorted(p.tolist()) == list(range(n))
    pos = np.empty(n)
    pos[p] = np.arange(n)
    assert abs(np.corrcoef(np.arange(n), pos)[0, 1]) < 0.03
    assert np.mean(p[:-1] < p[1:]) == pytest.approx(0.5, abs=0.02)
    orders = {tuple(_permutation(50, seed, epoch).tolist()) for seed in range(4) for epoch in range(4)}
    assert len(orders) == 16


def test_sampler_drop_last():
    s = EpochSampler(23, 5, seed=1)
    assert s.steps_per_epoch == 4
    seen_dropped = set()
    for epoch in range(6):
        batches = s.batches_for(epoch)
        assert batches == EpochSampler(23, 5, seed=1).batches_for(epoch)  # deterministic
        assert len(batches) == 4 and all(len(b) == 5 for b in batches)
        flat = [i for b in batches for i in b]
        assert len(set(flat)) == 20 and set(flat) <= set(range(23))
        seen_dropped |= set(range(23)) - set(flat)
    assert len(seen_dropped) > 3  # the dropped examples change with the epoch
    assert s.batches_for(0) != s.batches_for(1) and s.batches_for(0) != EpochSampler(23, 5, seed=2).batches_for(0)


def test_sampler_evaluation_keeps_everything_in_order():
    s = EpochSampler(11, 4, seed=0, shuffle=False, drop_last=False)
    assert s.steps_per_epoch == 3
    assert s.batches_for(0) == s.batches_for(9) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_length_bucketing(drop_last):
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 200, size=103).tolist()
    plain = EpochSampler(103, 8, seed=4, drop_last=drop_last)
    bucketed = EpochSampler(103, 8, seed=4, drop_last=drop_last, lengths=lengths, bucket=4)
    for epoch in range(3):
        pb, bb = plain.batches_for(epoch), bucketed.batches_for(epoch)
        assert bb == EpochSampler(103, 8, seed=4, drop_last=drop_last, lengths=lengths, bucket=4).batches_for(epoch)
        assert len(bb) == bucketed.steps_per_epoch == len(pb)
        assert sorted(i for b in bb for i in b) == sorted(i for b in pb for i in b)  # the same examples
        if not drop_last:
            assert all(len(b) == 8 for b in bb[:-1]) and len(bb[-1]) == 103 % 8

        def padded(batches):
            return sum(len(b) * max(lengths[i] for i in b) for b in batches)

        assert padded(bb) < 0.8 * padded(pb)


def test_resume_continues_exactly():
    """Steps 0..N-1 read from one sampler equal steps 0..k-1 then k..N-1 from a fresh one
    (a resumed run knows only the global step)."""
    n_steps = 17
    full = EpochSampler(30, 7, seed=11)
    straight = [full.batch_at(step) for step in range(n_steps)]
    k = 9
    resumed = EpochSampler(30, 7, seed=11)
    assert straight == [full.batch_at(s) for s in range(k)] + [resumed.batch_at(s) for s in range(k, n_steps)]
    for step in range(n_steps):
        epoch, index = full.position(step)
        assert full.to_global_step(epoch, index) == step and full.batches_for(epoch)[index] == straight[step]
    with pytest.raises(ValueError):
        full.to_global_step(0, full.steps_per_epoch)


def test_sampler_rejects_bad_sizes():
    with pytest.raises(ValueError, match="exceeds the 3 examples"):
        EpochSampler(3, 4, seed=0)
    assert EpochSampler(3, 4, seed=0, drop_last=False).batches_for(0) and True
    with pytest.raises(ValueError, match="lengths"):
        EpochSampler(3, 1, seed=0, lengths=[1, 2])


# ---- the data-parallel split ------------------------------------------------------------

def test_shard_for_rank_convention():
    dp, mb, accum = 3, 2, 4
    batch = list(range(100, 100 + dp * mb * accum))
    shards = [shard_for_rank(batch, r, dp, mb) for r in range(dp)]
    for r, micro in enumerate(shards):
        assert len(micro) == accum
        for m, items in enumerate(micro):
            start = m * dp * mb + r * mb
            assert items == batch[start:start + mb]
    assert sorted(i for micro in shards for items in micro for i in items) == batch
    with pytest.raises(ValueError, match="not a multiple"):
        shard_for_rank(batch[:-1], 0, dp, mb)


def test_shard_for_rank_pads_a_short_batch():
    shards = [shard_for_rank(list(range(7)), r, 2, 2, pad_value=-1) for r in range(2)]
    assert [len(s) for s in shards] == [2, 2] and all(len(m) == 2 for s in shards for m in s)
    flat = [i for s in shards for m in s for i in m]
    assert sorted(i for i in flat if i >= 0) == list(range(7)) and flat.count(-1) == 1


def test_shard_matches_pretraining_micro_batches():
    """The same split as pretraining's ``training.data.micro_batches``, run on a fake dataset."""
    from gpt_dist.training import data

    micro_batches = getattr(data, "micro_batches", None)
    if micro_batches is None:
        pytest.skip("training.data.micro_batches has moved (the formula test above still holds)")
    dp, mb, accum, consumed = 2, 3, 2, 24

    class Ids:
        def __len__(self):
            return 10_000

        def __getitem__(self, i):
            t = torch.tensor([i])
            return {"tokens": t, "labels": t, "loss_mask": t.float()}

    training = SimpleNamespace(micro_batch_size=mb)
    batch = list(range(consumed, consumed + dp * mb * accum))
    for r in range(dp):
        ctx = SimpleNamespace(dp=dp, dp_rank=r, device="cpu")
        theirs = [b["tokens"][:, 0].tolist() for b in micro_batches(Ids(), ctx, training, consumed, accum)]
        assert theirs == shard_for_rank(batch, r, dp, mb)
