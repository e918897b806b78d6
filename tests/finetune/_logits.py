"""Task logits of a fine-tuned export on JSONL files (a subprocess of test_predict.py: the
model needs a process group, which must not outlive the call in the pytest process), through
the inference runtime that launch/predict.py runs.

    python tests/finetune/_logits.py EXPORT OUT.npz FILE [FILE ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    from gpt_dist.finetune.batches import collate
    from gpt_dist.finetune.objective import _with_valid_label
    from gpt_dist.finetune.predict import load_classifier, spec_for, task_logits
    from gpt_dist.finetune.tasks import read_task_file
    from gpt_dist.inference import Runner, open_context

    export, out, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    with open_context(1, 1, "cpu") as ctx:
        loaded, spec = load_classifier(export, ctx)
        tok = loaded.tokenizer
        runner = Runner(loaded.model, ctx, loaded.cfg, task=loaded.task)
        arrays = {}
        for i, f in enumerate(files):
            s = spec_for(spec, f, tok)
            exs, _ = read_task_file(f, s, tok, require_labels=False)
            b = collate([_with_valid_label(e, s) for e in exs], tok.eod_id)
            arrays[f"logits{i}"] = task_logits(runner, b).double().numpy()
            arrays[f"tokens{i}"] = b["tokens"].numpy()
            arrays[f"extract{i}"] = b["extract_pos"].numpy()
    np.savez(out, **arrays)


if __name__ == "__main__":
    main()
