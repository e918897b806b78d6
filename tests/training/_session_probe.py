"""Probe: enter ``training_session`` in a one-process world and leave it normally, by an
error, or by ``NonFiniteLossError``; print whether process groups are still alive after.

    python tests/training/_session_probe.py CONFIG RUN_DIR ok|error|nonfinite
"""

import atexit
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist
from megatron.core import parallel_state as ps

from gpt_dist.config import load_config
from gpt_dist.training.loop import NonFiniteLossError
from gpt_dist.training.session import training_session


def groups() -> str:
    alive = dist.is_initialized() or ps.model_parallel_is_initialized()
    return "GROUPS ALIVE" if alive else "GROUPS DESTROYED"


if __name__ == "__main__":
    config, run_dir, mode = sys.argv[1:4]
    cfg = load_config(config, [f"run.dir={run_dir}"])
    atexit.register(lambda: print("at exit:", groups(), flush=True))
    try:
        with training_session(cfg, "probe") as s:
            print("inside:", groups(), s.ctx.world_size, flush=True)
            if mode == "error":
                raise RuntimeError("boom")
            if mode == "nonfinite":
                raise NonFiniteLossError("3 consecutive non-finite steps")
    except RuntimeError as exc:
        print("raised:", exc, flush=True)
    print("after:", groups(), flush=True)
