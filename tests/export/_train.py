"""Test runner: pretrain with the test hooks of tests/faults.py (a ZeRO-3 run logs its
partition report); the config's data.tokenizer is the toy tokenizer (tests/toy_data.py).

    torchrun --standalone --nproc-per-node N tests/export/_train.py CONFIG.json key=value ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import gpt_dist.training.pretrain as L
from gpt_dist.config import load_config
from tests.faults import EnvFaults

cfg = load_config(sys.argv[1], sys.argv[2:])
print("FINAL", L.pretrain(cfg, hooks=EnvFaults()))
