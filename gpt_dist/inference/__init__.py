"""The inference runtime: any model source on this rank's part of a TP x PP (x DP) layout,
serving zero-shot evaluation (``gpt_dist.eval``), generation (``gpt_dist.inference.generate``) and
prediction with a fine-tuned head (``gpt_dist.finetune.predict``).

    source.py   what ``--model PATH`` may name (native/HF export, local GPT-2 directory, run
                directory, fine-tuned export) read into full tensors, and its tokenizer
    model.py    the inference ``ParallelContext`` (``open_context``) and ``load_model``: the
                training model's builder, this rank's TP slice of this rank's stage
    runtime.py  ``Runner``: items (fill a KV cache, score tokens, last-position logits, task
                head) run stage by stage through ``pipeline.stage_parts``, activations sent
                between stages; lockstep passes for a ZeRO-3 engine's module
    vocab.py    log p(target), the greedy token and whole logits from vocabulary-parallel logits
    generate.py generation on the runtime: sampling (greedy, temperature, top-k, top-p), the
                KV cache's sliding window, text streaming (``TextStream``)

The applications keep their own logic on top: tasks, batching and metrics in ``gpt_dist.eval``,
task files and prediction rows in ``gpt_dist.finetune.predict``. Generation lives here because
evaluation (lm-eval's generate requests) and the ``launch/generate.py`` CLI both use it.
"""

from gpt_dist.inference.model import LoadedModel, load_model, open_context
from gpt_dist.inference.runtime import Classify, Fill, Last, Runner, Score
from gpt_dist.inference.source import InferenceError, Source, read_source

__all__ = ["Classify", "Fill", "InferenceError", "Last", "LoadedModel", "Runner", "Score", "Source",
           "load_model", "open_context", "read_source"]
