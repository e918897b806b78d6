"""Makes the checkout importable as it is for the runners (``from tests import helpers``),
whichever way pytest was started (``python -m pytest`` adds the working directory to
sys.path, the ``pytest`` script does not).

Without a GPU the Triton kernels run in Triton's interpreter (tests/kernels/conftest.py).
``TRITON_INTERPRET=1`` must be set before Triton is first imported, and megatron-core imports
Triton when it is imported itself (``megatron/core/utils.py``), which any test module of
tests/eval, tests/export or tests/finetune may do at collection, before tests/kernels is
collected: so it is set here, in the conftest pytest loads first.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
