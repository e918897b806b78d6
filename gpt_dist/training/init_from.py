"""``checkpoint.init_from``: a model's weights loaded into a freshly built engine, any layout.

The weights come from the export package's readers (an export, native or Hugging Face, or a
run directory's latest committed checkpoint, whatever layout wrote it, all as full native
tensors); this module is the part that touches the DeepSpeed engine: every rank copies its
TP slice into its stage of the module (ZeRO-3 parameters gathered and re-partitioned by
``load_state_into_model``), then the optimizer's fp32 master copies are refreshed. Fine-tuning
uses it twice: to start from the pretrained model, and to reload the best checkpoint before
predicting.
"""

from __future__ import annotations

from pathlib import Path

from gpt_dist import deepspeed_compat
from gpt_dist.config import ARCH_KEYS, Config
from gpt_dist.export.loader import load_model_state, load_state_into_model
from gpt_dist.export.names import TASK_PREFIX, ExportError, expected_shapes
from gpt_dist.parallel import ParallelContext
from gpt_dist.training.engine import Engine


def load_into_engine(path: Path | str, eng: Engine, cfg: Config, ctx: ParallelContext) -> None:
    """Load the model at ``path`` (an export or a run directory) into ``eng``.

    Every rank reads the export (safetensors, memory-mapped) and keeps its TP slice. Under
    bf16/fp16 the optimizer's fp32 master copies are refreshed from the module weights so the
    first step starts from the loaded values. A fine-tuning run (``cfg.finetune``) may start
    from an export with a smaller vocabulary (it grows, see ``load_state_into_model``) and
    without a task head, or with another task's (W_y keeps its initialisation)."""
    mcfg, state, task = load_model_state(Path(path))
    finetune = cfg.finetune is not None
    diff = [f"model.{k}: export {getattr(mcfg, k)!r} != config {getattr(cfg.model, k)!r}"
            for k in ARCH_KEYS if getattr(mcfg, k) != getattr(cfg.model, k)
            and not (k == "vocab_size" and finetune and mcfg.vocab_size < cfg.model.vocab_size)]
    if diff:
        raise ExportError(f"{path}: incompatible with this run's model: " + "; ".join(diff))
    mine = (cfg.finetune.task, cfg.finetune.head_outputs()) if cfg.finetune is not None else None
    if task is None or mine != (task.get("task"), task.get("n_out")):
        # pretraining, or another task's head: W_y starts from its initialisation
        state = {k: v for k, v in state.items() if not k.startswith(TASK_PREFIX)}
    loaded = set(load_state_into_model(eng.ds.module, state, ctx.tensor_parallel, cfg.model, grow_vocab=finetune))
    if ctx.pp == 1:  # a pipeline stage holds only its own layers
        missing = set(expected_shapes(mcfg)) - loaded
        if missing:
            raise ExportError(f"{path}: model parameters not loaded: {sorted(missing)[:5]}")
    deepspeed_compat.refresh_fp32_master_weights(eng.ds)
