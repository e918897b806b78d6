"""Fine-tuning's schedule is a value derived from the config and the data size
(``FinetuneConfig.schedule`` -> ``Schedule``), never written back into the config: GPT-1 §4.1,
epochs x (examples // global batch) steps, linear warmup over warmup_fraction, linear decay."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gpt_dist.config import Config, ConfigError, Schedule, config_from_dict, dump_config, load_config, validate
from gpt_dist.training.engine import lr_lambda
from tests import helpers

FT = helpers.ROOT / "configs" / "finetune_tiny_classification.json"
TINY = helpers.ROOT / "configs" / "tiny_cpu.json"


def _ft(**finetune: object) -> Config:
    raw = json.loads(FT.read_text())
    raw["finetune"].update(finetune)
    return config_from_dict(raw)


def test_pretraining_schedule_is_the_sections_as_written() -> None:
    cfg = load_config(TINY, ["schedule.decay_steps=null", "training.train_steps=40", "training.eval_interval=7",
                             "checkpoint.save_interval=9", "schedule.warmup_steps=3", "schedule.decay=cosine"])
    assert cfg.run_schedule() == Schedule(train_steps=40, warmup_steps=3, decay="cosine", decay_steps=40,
                                          eval_interval=7, save_interval=9)
    assert load_config(TINY, ["schedule.decay_steps=25"]).run_schedule().decay_steps == 25
    assert cfg.sequence_length == cfg.data.seq_len and cfg.sequence_length_key == "data.seq_len"


@pytest.mark.parametrize("n_train,epochs,frac,eval_every,save,want", [
    # steps/epoch = n // 32; total = epochs x that; warmup = ceil(frac x total);
    # validation and a checkpoint at least once an epoch
    (100, 3, 0.02, None, 1000, (9, 1, 3, 3)),
    (1000, 2, 0.1, 5, 1000, (62, 7, 5, 31)),
    (1000, 2, 0.0, 500, 4, (62, 0, 31, 4)),
    (32, 1, 0.002, None, 1000, (1, 1, 1, 1)),
])
def test_finetune_schedule_from_the_data_size(n_train, epochs, frac, eval_every, save, want) -> None:
    cfg = _ft(epochs=epochs, warmup_fraction=frac, eval_interval=eval_every)
    cfg.checkpoint.save_interval = save
    before = cfg.to_dict()
    got = cfg.run_schedule(n_train)
    steps, warmup, eval_interval, save_interval = want
    assert got == Schedule(train_steps=steps, warmup_steps=warmup, decay="linear", decay_steps=steps,
                           eval_interval=eval_interval, save_interval=save_interval, epoch_steps=n_train // 32)
    assert got.warmup_steps == math.ceil(frac * got.train_steps)
    assert cfg.to_dict() == before                          # no section rewritten
    with pytest.raises(AttributeError):
        got.train_steps = 1  # type: ignore[misc]            # frozen: computed once, passed around


def test_validation_and_a_checkpoint_at_every_epoch_end_whatever_the_intervals() -> None:
    """31 steps per epoch, validation every 5, a checkpoint every 4: both at 31 (the epoch's end,
    a multiple of neither) and at 62 (the last step) as well; pretraining has no epochs."""
    cfg = _ft(epochs=2, warmup_fraction=0.1, eval_interval=5)
    cfg.checkpoint.save_interval = 4
    plan = cfg.run_schedule(1000)
    evals = [s for s in range(1, plan.train_steps + 1) if plan.evaluates_at(s)]
    saves = [s for s in range(1, plan.train_steps + 1) if plan.saves_at(s)]
    assert evals == sorted({*range(5, 63, 5), 31, 62})
    assert saves == sorted({*range(4, 63, 4), 31, 62})
    pre = load_config(TINY, ["training.train_steps=10", "training.eval_interval=4", "checkpoint.save_interval=3"])
    assert [s for s in range(1, 11) if pre.run_schedule().evaluates_at(s)] == [4, 8, 10]
    assert [s for s in range(1, 11) if pre.run_schedule().saves_at(s)] == [3, 6, 9, 10]


def test_fewer_examples_than_a_global_batch_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^training\.global_batch_size: 32 exceeds the 31 training examples of "
                                          r"data/sample/tasks/classification/train\.jsonl$"):
        _ft().run_schedule(31)


def test_finetune_config_dumps_and_loads_unchanged(tmp_path: Path) -> None:
    cfg = _ft()
    cfg.run_schedule(1000)
    dump_config(cfg, tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == cfg


def test_lr_follows_the_schedule() -> None:
    cfg = _ft(warmup_fraction=0.1)
    cfg.optimizer.min_lr = cfg.optimizer.lr / 10
    plan = cfg.run_schedule(1000)                          # 93 steps, warmup 10, linear decay
    f = lr_lambda(cfg.optimizer, plan)
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(plan.warmup_steps) == pytest.approx(1.0)
    mid = (plan.warmup_steps + plan.train_steps) // 2
    assert f(mid) == pytest.approx(0.1 + 0.9 * (1 - (mid - 10) / (plan.train_steps - 10)))
    assert f(plan.train_steps) == pytest.approx(0.1) and f(plan.train_steps + 5) == pytest.approx(0.1)


def test_sequence_length_is_the_tasks() -> None:
    cfg = _ft()
    assert cfg.data.seq_len == 128 and cfg.sequence_length == cfg.model.n_ctx
    cfg = _ft(max_len=64)
    cfg.data.seq_len = 4096                                # the pretraining data's: not used here
    assert cfg.sequence_length == 64
    validate(cfg, 1, check_paths=False)
    cfg = _ft(max_len=256)
    with pytest.raises(ConfigError, match=r"^finetune\.max_len: 256 exceeds model\.n_ctx=128$"):
        validate(cfg, 1, check_paths=False)
