"""Makes the checkout importable as it is for the runners (``from tests import helpers``),
whichever way pytest was started (``python -m pytest`` adds the working directory to
sys.path, the ``pytest`` script does not)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
