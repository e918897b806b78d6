"""Every shipped config loads and validates.

gpt2_1.5b has 25 heads (odd), so tensor parallelism 2 cannot divide it; it
uses tp=1 with ZeRO-3 instead.
"""
import glob
import os
from pathlib import Path

import pytest

from gpt_dist.config import load_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.json")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_validates(path):
    cfg = load_config(path)
    world = 2 if "tiny" in os.path.basename(path) else 8
    validate(cfg, world, check_paths=False)


import json

from gpt_dist.config import ConfigError

TINY = os.path.join(ROOT, "configs", "tiny_cpu.json")


def _bad(tmp_path, edit, world=2):
    raw = json.loads(Path(TINY).read_text())
    edit(raw)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as ei:
        validate(load_config(str(p)), world, check_paths=False)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_unknown_key(tmp_path):
    assert "bogus" in _bad(tmp_path, lambda r: r["model"].update(bogus=1))


def test_seq_len_gt_n_ctx(tmp_path):
    assert "seq_len" in _bad(tmp_path, lambda r: r["data"].update(seq_len=256))


def test_n_head_tp(tmp_path):
    assert "n_head" in _bad(tmp_path, lambda r: (r["model"].update(n_head=3, n_embd=63), r["parallel"].update(tp=2)))


def test_global_batch_not_multiple(tmp_path):
    assert "global_batch_size" in _bad(tmp_path, lambda r: r["training"].update(global_batch_size=12))


def test_train_batch_size_given(tmp_path):
    assert "train_batch_size" in _bad(tmp_path, lambda r: r["deepspeed"].update(train_batch_size=8))


def test_n_layer_pp(tmp_path):
    assert "n_layer" in _bad(tmp_path, lambda r: (r["model"].update(n_layer=3), r["parallel"].update(pp=2),
                                                  r["training"].update(global_batch_size=4)))


def test_wrong_type(tmp_path):
    assert "n_layer" in _bad(tmp_path, lambda r: r["model"].update(n_layer="two"))


def test_launcher_bad_config_exits_2(tmp_path):
    import subprocess
    import sys
    raw = json.loads(Path(TINY).read_text())
    raw["model"]["bogus"] = 1
    p = tmp_path / "c.json"
    p.write_text(json.dumps(raw))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--config", str(p)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert r.returncode == 2, r.stderr
    lines = [l for l in (r.stderr + r.stdout).splitlines() if l.strip()]
    assert len(lines) == 1, lines


def test_gpt2_124m_analytic_parameters():
    from gpt_dist.model.gpt import analytic_parameters
    assert analytic_parameters(load_config(os.path.join(ROOT, "configs", "gpt2_124m.json")).model) == 124_439_808


def test_set_values_are_typed_by_json_then_literal_then_string():
    cfg = load_config(TINY, ["data.split=90,10,0", "training.train_steps=7", "optimizer.lr=1e-4",
                             'data.prefixes=["a", "b"]', "run.name=x y", "training.deterministic=false"])
    assert cfg.data.split == "90,10,0"  # a comma list is the string, never a tuple
    assert cfg.training.train_steps == 7 and cfg.optimizer.lr == 1e-4
    assert cfg.data.prefixes == ["a", "b"] and cfg.run.name == "x y"
    assert cfg.training.deterministic is False
