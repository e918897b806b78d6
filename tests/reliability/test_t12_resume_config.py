"""T12: resuming with an architecture-incompatible config fails with a diff of the keys;
benign changes are allowed. (Config-file rejections - exit 2 before any process group - are
tests/test_config.py's; the end-to-end benign change is T4's fallback run, which resumes
with another logging.log_interval.)"""

from __future__ import annotations

import pytest

from gpt_dist.training import checkpoint as ckpt
from tests.reliability import fake
from tests.reliability.test_t04_corrupt import _resume


@pytest.mark.parametrize("change", [{"n_embd": 64}, {"n_layer": 3}, {"vocab_size": 512},
                                    {"n_embd": 64, "n_head": 4}])
def test_incompatible_arch_refused_with_diff(tmp_path, change):
    fake.make_run(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="incompatible model config") as info:
        _resume(tmp_path, **change)
    msg = str(info.value)
    for key, value in change.items():
        assert f"model.{key}: checkpoint {fake.MODEL[key]!r} != config {value!r}" in msg
    assert "global_step10" in msg


@pytest.mark.parametrize("change", [{"dropout": 0.0}, {"attn_dropout": 0.2}, {"init_std": 0.01}])
def test_benign_model_change_allowed(tmp_path, change):
    fake.make_run(tmp_path)
    eng, state, _ = _resume(tmp_path, **change)
    assert eng.loads == ["global_step10"] and state.step == 10


def test_checkpoint_stores_resolved_config(tmp_path):
    fake.make_run(tmp_path)
    found = ckpt.find_resumable(tmp_path)
    assert found is not None and found.manifest["config"]["model"] == fake.MODEL
