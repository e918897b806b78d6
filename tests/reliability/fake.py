"""A stand-in for a DeepSpeed engine and a 1-rank ParallelContext, for unit tests of
gpt_dist.training.checkpoint: the real save/verify/commit/retention code, no processes.

The fake writes the same file names DeepSpeed writes under ZeRO (model states, one optimizer
shard per rank) through a ``checkpoint_engine.save`` as DeepSpeed does, and records whether
``load_checkpoint`` was ever reached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt_dist import rng
from gpt_dist.training import checkpoint as ckpt


@dataclass
class FakeCtx:
    rank: int = 0
    world_size: int = 1
    tp: int = 1
    pp: int = 1
    dp: int = 1
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - immutable

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        pass

    def all_gather_objects(self, obj: Any) -> list[Any]:
        return [obj]


class _CE:
    def save(self, state: Any, path: str) -> None:
        torch.save(state, path)


@dataclass
class FakeEngine:
    weight: torch.Tensor = field(default_factory=lambda: torch.arange(6, dtype=torch.float32))
    loads: list[str] = field(default_factory=list)
    checkpoint_engine: _CE = field(default_factory=_CE)

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool) -> None:
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"module": {"w": self.weight.clone()}, **client_state},
                                    str(d / "mp_rank_00_model_states.pt"))
        for r in range(2):
            self.checkpoint_engine.save({"optimizer_state_dict": {"exp_avg": self.weight * (r + 1)}},
                                        str(d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))

    def load_checkpoint(self, root: str, tag: str, **kw: Any) -> None:
        self.loads.append(tag)
        self.weight.copy_(torch.load(Path(root) / tag / "mp_rank_00_model_states.pt",
                                     weights_only=True)["module"]["w"])


MODEL = {"arch": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_ctx": 32, "vocab_size": 500,
         "bias": True}


def make_run(run_dir: Path, steps: tuple[int, ...] = (5, 10), keep_last: int = 3) -> FakeEngine:
    """A run directory with committed checkpoints at ``steps`` written by the real saver."""
    eng = FakeEngine()
    for step in steps:
        eng.weight += 1
        state = {"step": step, "consumed_samples": 8 * step, "skipped_steps": 0, "consecutive_skips": 0,
                 "tokens_seen": 128 * step, "last_val_loss": None}
        ckpt.save(eng, FakeCtx(), run_dir, step, {"gpt_dist": {"train_state": state}},
                  extra_manifest={"train_state": state, "config": {"model": dict(MODEL)}},
                  rng_state=rng.rng_state_dict(), keep_last=keep_last)
    return eng
