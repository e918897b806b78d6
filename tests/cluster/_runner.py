"""Run ``launch/pretrain.py`` (or any script) with a stand-in tokenizer when none exists.

    python tests/cluster/_runner.py launch/pretrain.py --config CFG --set ...

The cluster tests exercise launchers, not tokenizers: the toy shards (conftest.py) use a
500-token vocabulary with end-of-document id 499. When ``GPT_DIST_TEST_FAKE_TOKENIZER`` is
set (the tests set it), ``gpt_dist.training.pretrain.load_tokenizer_info`` is replaced by a
function returning that vocabulary. ``pretrain`` gets the faults of tests/faults.py (the
preemption tests' GPT_DIST_TEST_AWAIT_SIGNAL_AT). Then the script runs as ``__main__`` with
the remaining arguments, so launchers (torchrun, mpirun, srun, sbatch) see the real entry point.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: _runner.py SCRIPT [ARGS...]")
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(ROOT))
    fake = os.environ.get("GPT_DIST_TEST_FAKE_TOKENIZER")
    if fake:
        import gpt_dist.training.pretrain as pretraining

        vocab, eod = (int(x) for x in fake.split(","))
        pretraining.load_tokenizer_info = lambda cfg: (vocab, eod, f"test-vocab-{vocab}-{eod}")
    from tests.faults import EnvFaults, patch_pretrain

    patch_pretrain(EnvFaults())
    from gpt_dist import parallel

    discover = parallel.discover_launch_env

    def logged_discover() -> str:  # the tests check which launcher was recognised
        name = discover()
        env = os.environ
        print(f"[launcher] {name} rank {env['RANK']}/{env['WORLD_SIZE']} local {env['LOCAL_RANK']} "
              f"master {env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}", flush=True)
        return name

    parallel.discover_launch_env = logged_discover
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
