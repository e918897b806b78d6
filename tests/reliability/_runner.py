"""Worker entry point of the reliability suite: ``pretrain`` with the faults the launch asked
for (GPT_DIST_TEST_* variables, read in tests/faults.py).

The suite trains on synthetic shards whose vocabulary is 0..499 with end of document 499,
written by the toy tokenizer (tests/toy_data.py) that the configs name in data.tokenizer.
Exit codes follow launch/pretrain.py: 2 config error, 1 bad input / checkpoint error.
"""

from __future__ import annotations

import sys


def _record_attempt(run_dir) -> None:
    """One line per worker start: 'RESTART_COUNT RANK' (the suite counts torchrun restarts)."""
    import os
    from pathlib import Path

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / "attempts.log", "a") as fh:
        fh.write(f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')} {os.environ.get('RANK', '0')}\n")


def main(argv: list[str]) -> int:
    import gpt_dist.training.pretrain as pretraining
    from gpt_dist.config import ConfigError, load_config
    from gpt_dist.training.checkpoint import CheckpointError
    from tests.faults import EnvFaults

    try:
        cfg = load_config(argv[0], argv[1:])
        _record_attempt(cfg.run_dir)
        pretraining.pretrain(cfg, hooks=EnvFaults())
    except ConfigError as exc:
        print(f"pretrain: config error: {exc}", file=sys.stderr, flush=True)
        return 2
    except (FileNotFoundError, CheckpointError, ValueError) as exc:
        print(f"pretrain: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
