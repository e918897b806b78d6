"""The T1 golden file: per-step loss/grad_norm/lr of the reference run, with the library
versions (and CPU kernel capability) it was produced under.

Regenerate after an intended change (new library versions, a model change):

    GPT_DIST_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/reliability/test_t01_golden.py
    # or, standalone:
    .venv/bin/python -m tests.reliability.golden
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

KEYS = ("loss", "grad_norm", "lr")


def _golden_path() -> Path:
    """One golden file per CPU kernel capability (AVX2, AVX512, ...): torch picks different
    vectorised kernels on each, so the fp32 losses differ in the last bits across machines."""
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    return Path(__file__).resolve().parent / "golden" / f"t1_{cap}.json"


GOLDEN = _golden_path()


def versions() -> dict[str, str]:
    import deepspeed
    import megatron.core
    import numpy
    import torch

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "megatron-core": getattr(megatron.core, "__version__", "?"), "numpy": numpy.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def write(records: dict[int, dict[str, Any]], path: Path = GOLDEN) -> None:
    out = {"versions": versions(),
           "note": "reference run of tests/reliability (ZeRO-1, DP=2, fp32, CPU); regenerate with "
                   "GPT_DIST_REGEN_GOLDEN=1 or python -m tests.reliability.golden",
           "steps": {str(s): {k: round(records[s][k], 6) for k in KEYS} for s in sorted(records)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")


def load(path: Path = GOLDEN) -> dict[str, Any]:
    return json.loads(path.read_text())


if __name__ == "__main__":  # standalone regeneration: one reference run in a temp dir
    import tempfile

    from tests.reliability import conftest as c
    from tests.reliability import harness as h

    with tempfile.TemporaryDirectory() as tmp:
        data = h.build_shards(Path(tmp) / "data" / "toy")
        res = c.launch(Path(tmp), data, "ref")
        if res.rc != 0:
            sys.exit(res.describe())
        write(h.metrics(res.run_dir))
    print(f"wrote {GOLDEN}")
