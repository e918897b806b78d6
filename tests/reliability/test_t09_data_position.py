"""T9: the data position is one integer (consumed_samples); which samples a rank reads is a
pure function of it, so a resume reads exactly what the uninterrupted run would have read.

Unit tests of gpt_dist.training.data.micro_batches on an id-carrying dataset (DP=2,
gradient accumulation 2, an epoch shorter than the run). The end-to-end restore of
consumed_samples and the per-step sample-id digest are asserted in T2/T3/T7.
Policy for a changed global batch size on resume: the run continues by samples (the
position is a sample count, not a step count), like OLMo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt_dist.config import config_from_dict
from gpt_dist.training.data import micro_batches, sample_ids_digest

EPOCH = 40  # samples in the dataset; the run reads 3 epochs' worth


class IdDataset:
    def __len__(self) -> int:
        return EPOCH

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        t = torch.full((4,), i, dtype=torch.long)
        return {"tokens": t, "labels": t, "loss_mask": torch.ones(4)}


@dataclass
class Ctx:
    dp_rank: int
    dp: int = 2
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - immutable


CFG = config_from_dict({"training": {"micro_batch_size": 3, "global_batch_size": 12}})
ACCUM = 2  # 3 * 2 (accum) * 2 (dp) = 12


def _ids(consumed: int, rank: int) -> list[tuple[int, list[int]]]:
    return [(m, b["tokens"][:, 0].tolist())
            for m, b in enumerate(micro_batches(IdDataset(), Ctx(rank), CFG.training, consumed, ACCUM))]


def _run(start_step: int, end_step: int) -> list[tuple[int, int, int, list[int]]]:
    out = []
    for step in range(start_step, end_step):
        for rank in range(2):
            out += [(step, rank, m, ids) for m, ids in _ids(step * 12, rank)]
    return out


def test_resumed_order_equals_uninterrupted():
    full = _run(0, 10)
    resumed = _run(0, 4)[:-3] + _run(3, 10)  # killed mid-way through step 3's micro-batches
    assert [r for r in resumed if r[0] != 3] + [r for r in full if r[0] == 3] == \
        [r for r in full if r[0] != 3] + [r for r in full if r[0] == 3]
    assert _run(3, 10) == full[3 * 4:]


def test_each_step_reads_its_global_batch_once():
    for step in range(10):
        seen = sorted(i for _, _, _, ids in _run(step, step + 1) for i in ids)
        assert seen == sorted((step * 12 + k) % EPOCH for k in range(12))


def test_no_repeat_or_drop_within_an_epoch():
    by_position = {}
    for step, rank, m, batch in _run(0, 10):
        for i, sample in enumerate(batch):  # global position of the sample in the run
            by_position[step * 12 + m * 6 + rank * 3 + i] = sample
    assert sorted(by_position) == list(range(120))
    for e in range(3):
        assert sorted(by_position[e * EPOCH + k] for k in range(EPOCH)) == list(range(EPOCH))


def test_reading_batches_does_not_draw_from_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    _run(0, 5)
    assert torch.equal(before, torch.get_rng_state())


def test_digest_is_a_function_of_the_position():
    a = sample_ids_digest(Ctx(0), CFG.training, 24, ACCUM)
    assert a == sample_ids_digest(Ctx(1), CFG.training, 24, ACCUM) != sample_ids_digest(Ctx(0), CFG.training, 36, ACCUM)


def test_changed_global_batch_continues_by_samples():
    """Policy (README, "Reliability guarantees"): a resume with another global batch size
    starts at the checkpoint's consumed_samples; no sample is skipped or read twice."""
    before = sorted(i for _, _, _, ids in _run(0, 3) for i in ids)  # 36 samples at batch 12
    cfg24 = config_from_dict({"training": {"micro_batch_size": 3, "global_batch_size": 24}})
    after = sorted(i for rank in range(2)
                   for b in micro_batches(IdDataset(), Ctx(rank), cfg24.training, 36, 4)
                   for i in b["tokens"][:, 0].tolist())
    assert after == sorted((36 + k) % EPOCH for k in range(24))
    assert sorted(before + after) == sorted(k % EPOCH for k in range(60))
