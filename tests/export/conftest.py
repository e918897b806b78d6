"""Shared pieces of the export tests: a single-process parallel context and random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ctx():
    """World size 1, TP=1 on CPU (megatron-core's groups exist, so our layers work)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from gpt_dist import rng
    from gpt_dist.config import ParallelConfig
    from gpt_dist.parallel import ParallelContext

    c = ParallelContext.from_env(ParallelConfig(), device="cpu")
    rng.seed_all(0)
    return c


def small_cfg(arch: str = "gpt2", **kw):
    from gpt_dist.config import ModelConfig

    base = {"arch": arch, "n_layer": 2, "n_head": 4, "n_embd": 32, "n_ctx": 32, "vocab_size": 300,
                "dropout": 0.0, "attn_dropout": 0.0}
    base.update(kw)
    return ModelConfig(**base)


def random_model(cfg, seed: int = 0):
    """A TP=1 GPT whose every parameter (LN gains and biases too) is random, in eval mode."""
    from gpt_dist.model.gpt import build_model

    model = build_model(cfg, seed=seed)
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


BASE_CONFIG = {
    "run": {"name": "export_test", "dir": "unset"},
    "model": {"arch": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 32, "n_ctx": 32, "vocab_size": 500,
              "dropout": 0.1, "attn_dropout": 0.1},
    "parallel": {"tp": 1, "pp": 1},
    "optimizer": {"lr": 3e-3, "weight_decay": 0.01},
    "schedule": {"warmup_steps": 1, "decay": "constant"},
    "data": {"prefixes": [], "tokenizer": "", "seq_len": 16},
    "training": {"train_steps": 3, "micro_batch_size": 2, "global_batch_size": 4, "precision": "fp32",
                 "device": "cpu", "eval_interval": 3, "eval_steps": 1, "deterministic": True},
    "checkpoint": {"save_interval": 3, "keep_last": 2},
    "logging": {"log_interval": 1, "progress_bar": False, "tensorboard": False},
    "deepspeed": {"zero_optimization": {"stage": 1}},
}


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """One shard of learnable documents and a tokenizer directory with a file to copy."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = tmp_path_factory.mktemp("export_data")
    rs = np.random.RandomState(0)
    builder = IndexedDatasetBuilder(str(root / "toy_00000.bin"), dtype=np.uint16)
    for _ in range(200):
        n = rs.randint(20, 100)
        start, step = rs.randint(0, 499), rs.randint(1, 5)
        toks = [(start + step * i) % 499 for i in range(n)] + [499]
        builder.add_document(np.array(toks, dtype=np.uint16), [len(toks)])
    builder.finalize(str(root / "toy_00000.idx"))
    (root / "tok").mkdir()
    (root / "tok" / "vocab.txt").write_text("fake tokenizer file\n")
    return root


def train(toy_data: Path, run_dir: Path, nproc: int = 1, timeout: int = 300, **overrides) -> None:
    """Run tests/export/_train.py (torchrun when nproc > 1) with BASE_CONFIG + overrides."""
    import copy
    import json
    import subprocess
    import sys

    cfg = copy.deepcopy(BASE_CONFIG)
    cfg["run"]["dir"] = str(run_dir)
    cfg["data"]["prefixes"] = [str(toy_data / "toy")]
    cfg["data"]["tokenizer"] = str(toy_data / "tok")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / (run_dir.name + ".json")
    path.write_text(json.dumps(cfg))
    sets = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    runner = [str(ROOT / "tests" / "export" / "_train.py"), str(path), *sets]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", *runner]
    else:
        cmd = [sys.executable, *runner]
    env = dict(os.environ, OMP_NUM_THREADS="1", GPT_DIST_PG_TIMEOUT="300")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    res = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"training failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
