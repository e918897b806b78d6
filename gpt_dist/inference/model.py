"""Any model source loaded into this rank's part of the parallel model (TP x PP, and DP
replicas for evaluation), with its tokenizer: what evaluation, generation and prediction run.

Every rank reads the source's full tensors (``source.read_source``: exports are
memory-mapped safetensors) and keeps its TP slice (``export.load_state_into_model``) of the
model ``model.build.build_inference_model`` builds for its pipeline stage, the same ``GPT``
or ``PipelineModule`` stage that training builds, so a spec field cannot differ between
training and inference. A fine-tuned source keeps GPT-1's head (``task_head=True``, for
prediction), built from the run's own ``finetune`` section (``model.build.task_head_spec``,
what training built), or, for a Hugging Face double-heads directory, from its config. The
fused-kernel switches are this machine's defaults for inference (fp32: the reference path),
not the run's: they compute the same function, and a GPU run's kernels need not exist where
the model is used.

``open_context`` is the process's ``ParallelContext`` for inference: entry points hold it in
a ``with`` block, so the process groups are destroyed on every exit path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt_dist import rng
from gpt_dist.config import ConfigError, ModelConfig, ParallelConfig, config_from_dict
from gpt_dist.export import load_state_into_model
from gpt_dist.inference.source import (
    InferenceError,
    Source,
    check_tokenizer,
    find_tokenizer,
    read_source,
    state_fingerprint,
)
from gpt_dist.model.build import build_inference_model, task_head_spec
from gpt_dist.model.heads import TaskHeadSpec
from gpt_dist.parallel import ParallelContext

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def open_context(tp: int = 1, pp: int = 1, device: str = "auto") -> ParallelContext:
    """This process's ``ParallelContext`` for inference (world = tp * pp * dp); use it as
    ``with open_context(...) as ctx:``. Seeds the model-parallel RNG tracker the layers
    enter (no dropout runs: the model is in eval mode)."""
    try:
        ctx = ParallelContext.from_env(ParallelConfig(tp=tp, pp=pp), device=device)
    except ValueError as exc:
        raise InferenceError(f"--tp/--pp: {exc}") from None
    rng.seed_all(0)
    return ctx


@dataclass
class LoadedModel:
    """This rank's part of a model, ready for ``inference.runtime.Runner``."""

    model: Any
    """A ``GPT`` (pp=1) or this rank's ``PipelineModule`` stage, in eval mode."""
    cfg: ModelConfig
    ctx: Any
    tokenizer: Any
    fingerprint: str
    """sha256 of the model config and every weight (identical for an export and its run)."""
    source: dict[str, Any] = field(default_factory=dict)
    task: TaskHeadSpec | None = None
    training_config: dict[str, Any] | None = None
    eod_id: int | None = None

    @property
    def max_length(self) -> int:
        return self.cfg.n_ctx

    @property
    def prefix_id(self) -> int:
        """The token an empty context / the first rolling window conditions on (lm-eval's EOS)."""
        return int(self.tokenizer.eod_id)


def _task_head(src: Source) -> TaskHeadSpec:
    """GPT-1's head as the run built it (its config's ``finetune`` section)."""
    if src.task is None:
        raise InferenceError(f"{src.info.get('path')}: not a fine-tuned model (no task head); export a finetune run")
    if src.training_config and src.training_config.get("finetune"):
        try:
            run = src.training_config   # its init_from export need not exist here
            spec = task_head_spec(config_from_dict({**run, "checkpoint": {**run.get("checkpoint", {}),
                                                                          "init_from": None}}).finetune)
        except ConfigError as exc:
            raise InferenceError(f"{src.info.get('path')}: training_config: {exc}") from None
        if spec is not None:
            return spec
    t = src.task   # a Hugging Face double-heads directory: the head's shape from its weights
    return TaskHeadSpec(t["task"], int(t["n_out"]), float(t.get("dropout", 0.1)), float(t.get("lm_coef", 0.5)))


def load_model(path: str | Path, ctx: ParallelContext, *, tokenizer: str | None = None, dtype: str = "fp32",
               pipeline_partition: str = "parameters", task_head: bool = False, source: Source | None = None,
               require_tokenizer: bool = True) -> LoadedModel:
    """Build and load the model of ``path`` for this rank (module docstring). ``source``: one
    read already (``read_source``), e.g. by a checkpoint sweep. Without ``task_head`` a
    fine-tuned model is loaded as the language model it also is (W_y dropped). Without
    ``require_tokenizer`` a source with no tokenizer loads with ``tokenizer`` None (token ids)."""
    p = Path(path)
    src = source if source is not None else read_source(p)
    try:
        tok, recorded = find_tokenizer(p, tokenizer)
    except InferenceError:
        if require_tokenizer:
            raise
        tok, recorded = None, None
    cfg = src.cfg
    if tok is not None:
        check_tokenizer(tok, cfg, recorded, str(p))
    if cfg.n_head % ctx.tp:
        raise InferenceError(f"--tp: {ctx.tp} does not divide the model's {cfg.n_head} heads")
    if ctx.pp > cfg.n_layer:
        raise InferenceError(f"--pp: {ctx.pp} stages for {cfg.n_layer} layers")
    head = _task_head(src) if task_head else None
    state = src.state if head is not None else {k: v for k, v in src.state.items() if not k.startswith("task_head.")}
    mcfg = ModelConfig(**{**cfg.__dict__, "dropout": 0.0, "attn_dropout": 0.0})
    model = build_inference_model(mcfg, ctx, pipeline_partition, task=head)
    load_state_into_model(model, state, ctx.tensor_parallel, mcfg)
    model = model.to(device=ctx.device, dtype=DTYPES[dtype]).eval()
    info = {**src.info, "dtype": dtype}
    if tok is not None:
        info.update(tokenizer=getattr(tok, "kind", "?"), tokenizer_fingerprint=getattr(tok, "fingerprint", None))
    eod = src.eod_id if src.eod_id is not None else (int(tok.eod_id) if tok is not None else None)
    return LoadedModel(model, mcfg, ctx, tok, state_fingerprint(cfg, state), info, head, src.training_config, eod)
