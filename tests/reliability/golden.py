"""The T1 golden files: per-step loss/grad_norm/lr of the reference run, with the library
versions and the CPU kernel capability they were produced under, one file per capability.

Why per capability: torch dispatches its CPU kernels by capability (DEFAULT, AVX2, AVX512 on
x86-64), and a different kernel sums in a different order, so fp32 losses differ in their
last bits across machines. On a CPU whose capability has a golden file the reference run
must reproduce it to the file's 6 decimals; on any other (say a DEFAULT-only CPU, or an ARM
machine) the nearest recorded capability's file is the check, with a tolerance (see
ACROSS_CAPABILITIES in test_t01_golden.py).

Regenerate after an intended change (new library versions, a model change):

    GPT_DIST_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/reliability/test_t01_golden.py
    # or, standalone:
    .venv/bin/python -m tests.reliability.golden
    # another capability on the same machine (torch honours ATEN_CPU_CAPABILITY):
    ATEN_CPU_CAPABILITY=avx2 .venv/bin/python -m tests.reliability.golden
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

KEYS = ("loss", "grad_norm", "lr")
DIR = Path(__file__).resolve().parent / "golden"
#: x86-64 capabilities from the plainest kernels to the widest; "nearest" walks this order.
ORDER = ("DEFAULT", "AVX2", "AVX512")
#: The versions that decide the numbers (the interpreter's and the platform's do not: the
#: arithmetic is torch's, the data order numpy's, the schedule DeepSpeed's/megatron's).
NUMERIC = ("torch", "deepspeed", "megatron-core", "numpy")


def capability() -> str:
    """The CPU kernel capability torch dispatches to in this process."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def path_for(cap: str) -> Path:
    return DIR / f"t1_{cap}.json"


GOLDEN = path_for(capability())


def recorded() -> list[str]:
    """The capabilities that have a golden file."""
    return sorted(p.stem.removeprefix("t1_") for p in DIR.glob("t1_*.json"))


def nearest(cap: str, have: list[str]) -> str | None:
    """The recorded capability closest to ``cap`` in ORDER (the narrower one on a tie); for a
    capability outside ORDER (another architecture) the plainest recorded one."""
    if not have:
        return None
    if cap in have:
        return cap
    rank = {c: i for i, c in enumerate(ORDER)}
    if cap not in rank:
        return min(have, key=lambda c: rank.get(c, len(ORDER)))
    return min(have, key=lambda c: (abs(rank.get(c, len(ORDER)) - rank[cap]), rank.get(c, len(ORDER))))


def versions() -> dict[str, str]:
    import deepspeed
    import megatron.core
    import numpy
    import torch

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "megatron-core": getattr(megatron.core, "__version__", "?"), "numpy": numpy.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def numeric_versions(v: dict[str, str]) -> dict[str, str]:
    return {k: v.get(k, "?") for k in NUMERIC}


def write(records: dict[int, dict[str, Any]], path: Path = GOLDEN) -> None:
    out = {"versions": versions(),
           "note": "reference run of tests/reliability (ZeRO-1, DP=2, fp32, CPU); regenerate with "
                   "GPT_DIST_REGEN_GOLDEN=1 or python -m tests.reliability.golden",
           "steps": {str(s): {k: round(records[s][k], 6) for k in KEYS} for s in sorted(records)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")


def load(path: Path = GOLDEN) -> dict[str, Any]:
    return json.loads(path.read_text())


def compare(run: dict[int, dict[str, Any]], gold: dict[int, dict[str, float]],
            rel: float = 0.0) -> list[str]:
    """Differences beyond max(1e-6, rel * |golden|): 1e-6 is the file's rounding (6 decimals),
    so rel=0 asks for the golden digits exactly. lr is always held to 1e-6: the schedule is
    plain float arithmetic, the same on every CPU. A step missing from the run is a
    difference, never a silent pass."""
    bad = []
    for s in sorted(gold):
        if s not in run:
            bad.append(f"step {s}: not logged")
            continue
        for k in KEYS:
            tol = 1e-6 if k == "lr" else max(1e-6, rel * abs(gold[s][k]))
            if not abs(run[s][k] - gold[s][k]) <= tol:
                bad.append(f"step {s} {k}: {run[s][k]!r} vs golden {gold[s][k]!r} (tolerance {tol:.1e})")
    return bad


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
