#!/usr/bin/env python
"""Fine-tune a pretrained GPT-1/GPT-2 on a labelled task (GPT-1 §3.2: L3 = L2 + lambda L1).

    deepspeed launch/finetune.py --config configs/finetune_gpt1_paper.json
    torchrun --nproc-per-node 2 launch/finetune.py --config configs/finetune_tiny_mc.json
    python launch/finetune.py --config configs/finetune_tiny_cls.json --set finetune.epochs=1

The config is the pretraining tree plus a ``finetune`` section (gpt_dist/config/finetune.py);
``checkpoint.init_from`` names an export (native or Hugging Face) or a run directory. Exit
codes: 2 for a config or task-file error (one line naming the key or FILE:LINE), 1 for other
bad input (a checkpoint, an export), 17 after too many non-finite steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config JSON with a finetune section")
    parser.add_argument("--set", dest="overrides", action="append", default=[], nargs="+",
                        metavar="SECTION.KEY=VALUE", help="override config values")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = [item for group in args.overrides for item in group]
    # torch (~1 s): imported after the arguments parse, so --help and usage errors are instant
    from gpt_dist.config import ConfigError, load_config
    from gpt_dist.export import ExportError
    from gpt_dist.finetune.tasks import TaskFileError
    from gpt_dist.training.checkpoint import CheckpointError

    try:
        cfg = load_config(args.config, overrides)
        # the fine-tuning session (model, engine, DeepSpeed): only once the config has loaded
        from gpt_dist.finetune.session import finetune

        finetune(cfg)
    except ConfigError as exc:
        print(f"finetune: config error: {exc}", file=sys.stderr)
        return 2
    except TaskFileError as exc:
        print(f"finetune: task file error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, CheckpointError, ExportError, ValueError) as exc:
        print(f"finetune: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
