"""The model under evaluation: the inference runtime's ``LoadedModel`` (``gpt_dist.inference``)
loaded as a language model (a fine-tuned model's task head is dropped: it is scored as the
LM it also is), with the tokenizer it is scored with.

``EvalError`` is the runtime's ``InferenceError``: a bad task file and a bad model source are
the same kind of error for ``launch/evaluate.py`` (one line, exit status 2), so one class.
"""

from __future__ import annotations

from pathlib import Path

from gpt_dist.inference import InferenceError, LoadedModel, Source, load_model
from gpt_dist.parallel import ParallelContext

EvalError = InferenceError
EvalModel = LoadedModel


def load_eval_model(path: str | Path, ctx: ParallelContext, tokenizer: str | None = None, dtype: str = "fp32",
                    pipeline_partition: str = "parameters", source: Source | None = None) -> LoadedModel:
    """``inference.load_model`` for scoring: no task head, a tokenizer required."""
    return load_model(path, ctx, tokenizer=tokenizer, dtype=dtype, pipeline_partition=pipeline_partition,
                      source=source)
