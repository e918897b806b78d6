"""Zero-shot evaluation (GPT-2 style) of an export, a Hugging Face GPT-2 directory or a run.

    python launch/evaluate.py --model exports/NAME --tasks lambada,wikitext,hellaswag --data-dir evals/ \\
        --out results.json
    torchrun --nproc-per-node 4 launch/evaluate.py --model runs/NAME --tp 2 --pp 2 --tasks ...
    python launch/evaluate.py --model runs/NAME --all-checkpoints --tasks ... --out sweep.json
    python launch/evaluate.py --model exports/NAME --harness lm-eval --tasks my_task --include-path tasks/
    python launch/evaluate.py --config eval.json --set eval.tp=2 eval.limit=100

The options are the config's ``eval`` section (gpt_dist/config/evaluation.py): ``--config``,
then the short flags (aliases of its keys), then ``--set eval.KEY=VALUE``. Built-in tasks use
lm-evaluation-harness's definitions (docs/eval.md); --harness lm-eval runs any lm-eval task on
the project's model. Errors are one line; exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":
    from gpt_dist.eval.driver import main

    sys.exit(main())
