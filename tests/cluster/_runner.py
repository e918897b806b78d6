"""Run ``launch/pretrain.py`` (or any script) with the test faults and a launcher log line.

    python tests/cluster/_runner.py launch/pretrain.py --config CFG --set ...

``pretrain`` gets the faults of tests/faults.py (the preemption tests'
GPT_DIST_TEST_AWAIT_SIGNAL_AT), and the launcher that ``discover_launch_env`` recognised is
printed. Then the script runs as ``__main__`` with the remaining arguments, so launchers
(torchrun, mpirun, srun, sbatch) see the real entry point. The configs name the toy
tokenizer (tests/toy_data.py) that wrote the toy shards.
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
