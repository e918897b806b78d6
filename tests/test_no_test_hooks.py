"""The product reads no test variable: fault injection lives in tests/ (tests/faults.py).

A ``GPT_DIST_TEST_*`` read in the library would switch test behaviour on in a real job
whenever the variable leaked into its environment (sbatch exports the submitting shell's).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("gpt_dist", "launch", "data_tools", "slurm", "configs")


def test_product_sources_never_mention_a_test_variable():
    scanned, hits = 0, []
    for top in PRODUCT:
        for path in sorted((ROOT / top).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts or path.suffix in (".pyc", ".so"):
                continue
            scanned += 1
            for no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if "GPT_DIST_TEST" in line:
                    hits.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()}")
    assert scanned > 50, f"only {scanned} files scanned: wrong root {ROOT}?"
    assert hits == [], "\n".join(hits)
