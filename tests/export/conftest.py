"""Shared pieces of the export tests: a single-process parallel context and random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import helpers

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ctx():
    """World size 1, TP=1 on CPU (megatron-core's groups exist, so our layers work; the
    launcher variables stay set: tests build DeepSpeed engines in this process)."""
    from gpt_dist import rng

    with helpers.solo_context(keep_env=True) as c:
        rng.seed_all(0)
        yield c


def small_cfg(arch: str = "gpt2", **kw):
    from gpt_dist.config import ModelConfig

    base = {"arch": arch, "n_layer": 2, "n_head": 4, "n_embd": 32, "n_ctx": 32, "vocab_size": 300,
                "dropout": 0.0, "attn_dropout": 0.0}
    base.update(kw)
    return ModelConfig(**base)


def random_model(cfg, seed: int = 0):
    """A TP=1 GPT whose every parameter (LN gains and biases too) is random, in eval mode."""
    from gpt_dist.model.build import build_gpt

    model = build_gpt(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def native_state(model, cfg):
    """The model's full native state (real vocabulary rows only)."""
    from gpt_dist.export import canonical_name

    out = {}
    for name, p in model.named_parameters():
        canon = canonical_name(name, cfg.n_layer)
        if canon is not None:
            out[canon] = p.detach().clone()
    out["wte.weight"] = out["wte.weight"][: cfg.vocab_size].clone()
    return out


#: the export tests' toy run: configs/tiny_cpu.json with these changes (tests/helpers.py);
#: ``train`` points data.tokenizer at the toy tokenizer
BASE_CONFIG = helpers.toy_config_dict(
    "unset", [], tokenizer="",
    run={"name": "export_test"},
    model={"n_layer": 2, "n_embd": 32, "n_ctx": 32, "vocab_size": 500},
    schedule={"warmup_steps": 1, "decay": "constant"},
    data={"seq_len": 16},
    training={"train_steps": 3, "micro_batch_size": 2, "global_batch_size": 4, "eval_interval": 3, "eval_steps": 1},
    checkpoint={"save_interval": 3},
    logging={"log_interval": 1, "tensorboard": False},
)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """One shard of learnable documents, written by the toy tokenizer."""
    root = tmp_path_factory.mktemp("export_data")
    helpers.toy_shards(root / "toy_00000", n_docs=200, lengths=(20, 100), seed=0)
    return root


def train(toy_data: Path, run_dir: Path, nproc: int = 1, timeout: int = 300, **overrides) -> Path:
    """Run tests/export/_train.py (torchrun when nproc > 1) with BASE_CONFIG + overrides
    (``section.key`` = value, as ``--set`` takes them); returns the run directory."""
    import json

    cfg = helpers.make_config(BASE_CONFIG, run_dir, [toy_data / "toy"])
    cfg["data"]["tokenizer"] = str(helpers.toy_tokenizer())
    run_dir.mkdir(parents=True, exist_ok=True)
    path = helpers.write_config(run_dir.parent / (run_dir.name + ".json"), cfg)
    sets = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    runner = [ROOT / "tests" / "export" / "_train.py", path, *sets]
    cmd = helpers.torchrun_cmd(*runner, nproc=nproc) if nproc > 1 else helpers.python_cmd(*runner)
    res = helpers.run(cmd, env=helpers.child_env(GPT_DIST_PG_TIMEOUT="300"), timeout=timeout, run_dir=run_dir)
    if res.rc != 0:
        raise AssertionError(f"training failed ({res.rc}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return run_dir
