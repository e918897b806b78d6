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
    from tests import helpers

    raw = json.loads(Path(TINY).read_text())
    raw["model"]["bogus"] = 1
    p = tmp_path / "c.json"
    p.write_text(json.dumps(raw))
    r = helpers.run(helpers.python_cmd(os.path.join(ROOT, "launch", "pretrain.py"), "--config", p), timeout=120)
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


# ----------------------------------------------------------------- precision vs the device
# gpt_dist.device.supported_precisions is the one capability lookup; forcing it both ways
# shows validate() refuses exactly what the device lacks (a CPU without oneDNN fp16 is the
# real case: DeepSpeed's engine would fail later with "Type fp16 is not supported").


def _forced(monkeypatch, *ok: str) -> None:
    from gpt_dist import device

    monkeypatch.setattr(device, "supported_precisions", lambda dev: ("cpu (forced CPU)", ("fp32", *ok)))


@pytest.mark.parametrize("prec", ["fp16", "bf16"])
def test_precision_the_device_lacks_is_a_config_error(monkeypatch, prec):
    _forced(monkeypatch, *({"fp16", "bf16"} - {prec}))
    cfg = load_config(TINY, [f"training.precision={prec}"])
    with pytest.raises(ConfigError) as ei:
        validate(cfg, 2, check_paths=False, check_device=True)
    msg = str(ei.value)
    assert msg.startswith("training.precision: ") and "\n" not in msg, msg
    assert prec in msg and "cpu (forced CPU)" in msg and "fp32" in msg, msg


@pytest.mark.parametrize("prec", ["fp16", "bf16", "fp32"])
def test_precision_the_device_has_validates(monkeypatch, prec):
    _forced(monkeypatch, "bf16", "fp16")
    validate(load_config(TINY, [f"training.precision={prec}"]), 2, check_paths=False, check_device=True)


def test_dry_run_checks_do_not_ask_this_device(monkeypatch):
    """check_paths=False (the dry run, planning for another machine) skips the device too."""
    _forced(monkeypatch)  # fp32 only
    validate(load_config(TINY, ["training.precision=bf16"]), 2, check_paths=False)


def test_capability_is_deepspeeds_cpu_accelerator():
    """The lookup reports what DeepSpeed's CPU accelerator (the one CPU training uses) says."""
    import torch
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    from gpt_dist import device

    desc, ok = device.supported_precisions("cpu")
    acc = CPU_Accelerator()
    assert desc.startswith("cpu (")
    assert ("fp16" in ok) == bool(acc.is_fp16_supported()) == bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    assert ("bf16" in ok) == bool(acc.is_bf16_supported()) and "fp32" in ok


def test_launcher_exits_2_when_the_device_lacks_the_precision(tmp_path):
    """launch/pretrain.py with the capability forced off (a wrapper patches the lookup, then
    runs the real entry point): one line naming training.precision, exit 2, no process group."""
    import subprocess
    import sys

    wrapper = (
        "import runpy, sys\n"
        "from gpt_dist import device\n"
        "device.supported_precisions = lambda dev: ('cpu (forced CPU)', ('fp32',))\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = ROOT
    r = subprocess.run([sys.executable, "-c", wrapper, os.path.join(ROOT, "launch", "pretrain.py"),
                        "--config", TINY, "--set", "training.precision=bf16", f"run.dir={tmp_path}/run"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env, check=False)
    lines = [line for line in (r.stderr + r.stdout).splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "training.precision: bf16 is not supported" in lines[0], lines
    assert "cpu (forced CPU)" in lines[0] and "fp32" in lines[0], lines
    assert not (tmp_path / "run").exists()  # refused before the run directory was written


def test_config_package_has_no_import_cycle():
    """errors.py is the bottom (imports nothing of the project); the rest form a DAG."""
    import ast
    from graphlib import CycleError, TopologicalSorter

    pkg = Path(ROOT) / "gpt_dist" / "config"
    graph = {}
    for path in pkg.glob("*.py"):
        tree = ast.parse(path.read_text())
        graph[path.stem] = {n.module.rsplit(".", 1)[-1] for n in ast.walk(tree)
                            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("gpt_dist.config.")}
        project = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                   and n.module.startswith("gpt_dist")}
        if path.stem == "errors":
            assert project == set(), project
    assert {"errors", "sections", "kernels", "finetune", "evaluation", "tree", "loader", "checks"} <= set(graph)
    try:
        order = list(TopologicalSorter({k: v - {k} for k, v in graph.items()}).static_order())
    except CycleError as exc:  # pragma: no cover - the failure this test exists for
        pytest.fail(f"import cycle in gpt_dist/config: {exc.args[1]}")
    assert order[0] == "errors" and order[-1] == "__init__"
