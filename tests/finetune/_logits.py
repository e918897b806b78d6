"""Task logits of a fine-tuned export on JSONL files (a subprocess of test_predict.py: the
model needs a process group, which must not outlive the call in the pytest process).

    python tests/finetune/_logits.py EXPORT OUT.npz FILE [FILE ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    import dataclasses

    from gpt_dist.finetune.batches import collate
    from gpt_dist.finetune.objective import _with_valid_label
    from gpt_dist.finetune.predict import load_classifier
    from gpt_dist.finetune.task_data import task_spec
    from gpt_dist.finetune.tasks import TaskSpec, read_task_file

    export, out, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    model, spec, tok = load_classifier(export)
    arrays = {}
    for i, f in enumerate(files):
        s = spec
        if not isinstance(s, TaskSpec):
            s = task_spec(dataclasses.replace(s, finetune=dataclasses.replace(s.finetune, train_file=f)), tok)
        exs, _ = read_task_file(f, s, tok, require_labels=False)
        b = collate([_with_valid_label(e, s) for e in exs], tok.eod_id)
        with torch.no_grad():
            _, _, logits = model(b["tokens"], b["lm_labels"], b["lm_mask"], None, b["extract_pos"], b["task_labels"])
        arrays[f"logits{i}"] = logits.double().numpy()
        arrays[f"tokens{i}"] = b["tokens"].numpy()
        arrays[f"extract{i}"] = b["extract_pos"].numpy()
    np.savez(out, **arrays)


if __name__ == "__main__":
    main()
