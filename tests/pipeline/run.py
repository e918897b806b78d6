"""Test runner: ``launch/pretrain`` with the test faults.

    torchrun ... tests/pipeline/run.py CONFIG.json key=value ...

The config (conftest.py ``toy_data``) points ``data.tokenizer`` at the real toy tokenizer
that wrote the toy shards.

Faults and probes come from GPT_DIST_TEST_* variables (tests/faults.py): KILL_AT, and
TIED_DIR=DIR, where after every optimizer step each rank that holds the tied token
embedding (first and last pipeline stage) saves its copy (its TP shard) to
DIR/tied_rank{R}_step{S}.pt, so the test can check the copies stay equal; KERNEL_COUNTS=PATH
counts the fused kernels' calls per rank (tests/pipeline/kernel_probe.py).
"""

import os
import sys

import gpt_dist.training.pretrain as L
from gpt_dist.config import load_config
from tests.faults import EnvFaults

if __name__ == "__main__":
    if os.environ.get("GPT_DIST_TEST_KERNEL_COUNTS"):
        from tests.pipeline.kernel_probe import install

        install(os.environ["GPT_DIST_TEST_KERNEL_COUNTS"])
    cfg = load_config(sys.argv[1], [a for a in sys.argv[2:] if a != "--set"])
    state = L.pretrain(cfg, hooks=EnvFaults())
    print("FINAL", state)
