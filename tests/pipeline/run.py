"""Test runner: ``launch/pretrain`` with the tokenizer info stubbed and the test faults.

    torchrun ... tests/pipeline/run.py CONFIG.json key=value ...

Faults and probes come from GPT_DIST_TEST_* variables (tests/faults.py): KILL_AT, and
TIED_DIR=DIR, where after every optimizer step each rank that holds the tied token
embedding (first and last pipeline stage) saves its copy (its TP shard) to
DIR/tied_rank{R}_step{S}.pt, so the test can check the copies stay equal.
"""

import sys

import gpt_dist.training.pretrain as L
from gpt_dist.config import load_config
from tests.faults import EnvFaults

L.load_tokenizer_info = lambda cfg: (500, 499, "fake")  # toy data: ids < 500, 499 = end of doc

if __name__ == "__main__":
    cfg = load_config(sys.argv[1], [a for a in sys.argv[2:] if a != "--set"])
    state = L.pretrain(cfg, hooks=EnvFaults())
    print("FINAL", state)
