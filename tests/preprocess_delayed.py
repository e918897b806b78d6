"""``data_tools/preprocess.py`` with every worker batch slowed down, so a test can kill a
worker (or the whole job) while the run is in flight.

    GPT_DIST_TEST_WORKER_DELAY=SECONDS python tests/preprocess_delayed.py PREPROCESS-ARGS...

The library has no test hook for this: ``gpt_dist.data.worker.process_batch`` is wrapped
here before preprocessing imports it. The wrapper keeps the function's module and name, so
it pickles to the pool's workers as ``gpt_dist.data.worker.process_batch`` and the forked
workers (which inherit this module table) resolve it to the wrapper too.
"""

from __future__ import annotations

import functools
import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    delay = float(os.environ.get("GPT_DIST_TEST_WORKER_DELAY", "0") or 0)
    sys.argv = [str(ROOT / "data_tools" / "preprocess.py"), *sys.argv[1:]]
    sys.path.insert(0, str(ROOT))
    from gpt_dist.data import worker

    inner = worker.process_batch

    @functools.wraps(inner)
    def process_batch(batch: list[Any]) -> list[Any]:
        time.sleep(delay)
        return inner(batch)

    worker.process_batch = process_batch
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
