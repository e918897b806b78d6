"""Structure the docs promise, checked (docs/architecture.md).

* megatron-core's global ``parallel_state`` is read only by ``gpt_dist/parallel.py``: every
  other module of the project gets its groups from the ``ParallelContext`` (or the
  ``TPGroup`` it hands the model), so no code can use a group the context does not own or
  outlive the context that destroys them. megatron-core's own layers read its globals
  internally, which ``parallel.py`` initialises.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARALLEL_STATE = re.compile(r"\bparallel_state\b|\bmegatron\.core\.mpu\b|from megatron\.core import .*\bmpu\b")


def _hits(pattern: re.Pattern[str], allowed: set[str], tops: tuple[str, ...]) -> tuple[int, list[str]]:
    scanned, hits = 0, []
    for top in tops:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            scanned += 1
            if rel in allowed:
                continue
            for no, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{rel}:{no}: {line.strip()}")
    return scanned, hits


def test_only_parallel_py_reads_megatron_parallel_state():
    scanned, hits = _hits(PARALLEL_STATE, {"gpt_dist/parallel.py"}, ("gpt_dist", "launch", "data_tools"))
    assert scanned > 50, f"only {scanned} files scanned: wrong root {ROOT}?"
    assert hits == [], "\n".join(hits)


def test_the_check_finds_a_read(tmp_path):
    """Negative control: the pattern catches the forms a read takes."""
    for line in ("from megatron.core import parallel_state as ps", "import megatron.core.parallel_state",
                 "from megatron.core.parallel_state import get_tensor_model_parallel_group",
                 "from megatron.core import mpu"):
        assert PARALLEL_STATE.search(line), line
    assert not PARALLEL_STATE.search("from megatron.core import tensor_parallel")
