"""One multi-process launch (tests/training/_parallel_worker.py) shared by every test here.

The toy shards are learnable arithmetic sequences mod 499 (499 = end of document), as in
tests/pipeline; the worker's module docstring lists the runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import helpers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = HERE / "_parallel_worker.py"


class Runs:
    """What the worker left in OUT: metrics of each run, the forward/backward dumps."""

    def __init__(self, out: Path, log: str) -> None:
        self.out, self.log = out, log  # log: every run's output together (diagnostics only)

    def records(self, name: str) -> list[dict]:
        """The training records (one per step) of a run, in the order logged."""
        return [r for r in helpers.metrics_records(self.out / name) if "loss" in r]

    def losses(self, name: str) -> list[float]:
        train = {r["step"]: r["loss"] for r in self.records(name)}
        assert sorted(train) == list(range(1, len(train) + 1)), (name, sorted(train))
        return [train[s] for s in sorted(train)]

    def steps(self, name: str) -> list[int]:
        """The step of every training record in the order logged (a restart shows as a repeat)."""
        return [r["step"] for r in self.records(name)]

    def val_loss(self, name: str) -> float:
        vals = [r["val_loss"] for r in helpers.metrics_records(self.out / name) if "val_loss" in r]
        assert vals, f"{name}: no validation loss logged"
        return vals[-1]

    def second_start_log(self, name: str) -> str:
        """What the second start of an interrupted run logged (that run alone)."""
        return (self.out / name / "second_start.log").read_text()

    def fwd_bwd(self, tag: str) -> dict:
        import torch

        return torch.load(self.out / f"{tag}.pt", weights_only=False)  # written by our worker


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("training")
    data = helpers.toy_shards(root / "data" / "toy", n_docs=300, lengths=(10, 80), seed=0)
    out = root / "out"
    res = helpers.run(helpers.python_cmd(WORKER, out, data), timeout=420, log=root / "worker.log")
    assert res.rc == 0 and (out / "done").exists(), (
        f"worker rc={res.rc} after {res.wall_s:.0f} s\n{res.stdout[-6000:]}")
    return Runs(out, res.stdout)
