"""Test runner: ``launch/pretrain`` with the tokenizer info stubbed and a tied-weight dump.

    torchrun ... tests/pipeline/run.py CONFIG.json key=value ...

GPT_DIST_TEST_TIED_DIR=DIR: after every optimizer step each rank that holds the tied token
embedding (first and last pipeline stage) saves its copy (its TP shard) to
DIR/tied_rank{R}_step{S}.pt, so the test can check the copies stay equal.
"""

import os
import sys

import torch

import gpt_dist.training.loop as L
from gpt_dist.config import load_config

L.load_tokenizer_info = lambda cfg: (500, 499, "fake")  # toy data: ids < 500, 499 = end of doc
_train_step = L.train_step


def _train_step_dumping_tied(cfg, ctx, eng, batches, inject=None):
    out = _train_step(cfg, ctx, eng, batches, inject)
    where = os.environ.get("GPT_DIST_TEST_TIED_DIR")
    if where and eng.is_pipeline and "embed" in eng.ds.module.tied_modules:
        w = eng.ds.module.tied_modules["embed"].wte.weight.detach().clone()
        torch.save(w, os.path.join(where, f"tied_rank{ctx.rank}_step{eng.ds.global_steps}.pt"))
    return out


L.train_step = _train_step_dumping_tied

if __name__ == "__main__":
    cfg = load_config(sys.argv[1], [a for a in sys.argv[2:] if a != "--set"])
    state = L.pretrain(cfg)
    print("FINAL", state)
