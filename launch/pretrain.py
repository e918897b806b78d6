#!/usr/bin/env python
"""Pretrain a GPT-1/GPT-2 model.

    deepspeed launch/pretrain.py --config configs/gpt2_1.5b.json
    torchrun --nproc-per-node 2 launch/pretrain.py --config configs/tiny_cpu.json
    python launch/pretrain.py --config configs/tiny_cpu.json --set training.train_steps=50
    python launch/pretrain.py --config configs/gpt2_1.5b.json --dry-run --nodes 8 --gpus-per-node 8
"""

from __future__ import annotations

import argparse
import sys

from gpt_dist.config import ConfigError, load_config
from gpt_dist.dryrun import dry_run
from gpt_dist.training.checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config JSON (configs/*.json)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], nargs="+",
                        metavar="SECTION.KEY=VALUE", help="override config values")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the rank grid, parameters and memory per GPU, then exit")
    parser.add_argument("--nodes", type=int, default=1, help="with --dry-run: number of nodes")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="with --dry-run: GPUs per node")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = [item for group in args.overrides for item in group]
    try:
        cfg = load_config(args.config, overrides)
        if args.dry_run:
            print(dry_run(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node))
            return 0
        # megatron-core (~3 s): not paid by --dry-run, --help or load_config's one-line errors
        from gpt_dist.training.pretrain import pretrain

        pretrain(cfg)
    except ConfigError as exc:
        print(f"pretrain: config error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, CheckpointError, ValueError) as exc:
        # Bad input (missing shards, a corrupt checkpoint, a corrupt shard): one line, exit 1.
        print(f"pretrain: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
