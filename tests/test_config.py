"""Every shipped config loads and validates.

gpt2_1.5b has 25 heads (odd), so tensor parallelism 2 cannot divide it; it
uses tp=1 with ZeRO-3 instead.
"""
import glob
import os

import pytest

from gpt_dist.config import load_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.json")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_validates(path):
    cfg = load_config(path)
    world = 2 if "tiny" in os.path.basename(path) else 8
    validate(cfg, world, check_paths=False)
