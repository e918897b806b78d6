"""Model construction in one place: the spec from config sections, and the plain (pp=1) or
pipeline model built from it, inside ZeRO-3's ``zero.Init`` when the run shards parameters.

Training (``training/engine.py``), fine-tuning, evaluation, generation and prediction all
build through here, so a spec field (the TP group, sequence parallelism, the seed, the
fine-tuning head, the kernels) cannot differ between them. ``ModelSpec`` is assembled
nowhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from torch import nn

from gpt_dist.config import Config, FinetuneConfig, KernelChoice, ModelConfig, ParallelConfig, kernels_for
from gpt_dist.model.gpt import GPT, ModelSpec
from gpt_dist.model.heads import TaskHeadSpec
from gpt_dist.parallel import ParallelContext, TPGroup
from gpt_dist.pipeline import build_pipeline_module


def task_head_spec(ft: FinetuneConfig | None) -> TaskHeadSpec | None:
    """GPT-1's head from the ``finetune`` section (None when pretraining: no section)."""
    if ft is None:
        return None
    return TaskHeadSpec(task=ft.task, n_out=ft.head_outputs(), dropout=ft.classifier_dropout,
                        lm_coef=ft.lm_coef)


def model_spec(cfg: Config, tp: TPGroup) -> ModelSpec:
    """The spec of a run's model from its config sections, on the TP group ``tp``."""
    return ModelSpec(cfg.model, tp_group=tp, sequence_parallel=cfg.parallel.sequence_parallel,
                     seed=cfg.training.seed, task=task_head_spec(cfg.finetune), kernels=kernels_for(cfg))


def build_gpt(mcfg: ModelConfig, tp: TPGroup | None = None, *, sequence_parallel: bool = False,
              seed: int = 1234, kernels: KernelChoice | None = None, task: TaskHeadSpec | None = None) -> GPT:
    """A plain ``GPT`` from the model section alone (one process, or this rank's TP slice of
    ``tp``): exports, references, benchmarks. Initialised from (seed, parameter name)."""
    return GPT(ModelSpec(mcfg, tp_group=tp or TPGroup(), sequence_parallel=sequence_parallel, seed=seed,
                         task=task, kernels=kernels or KernelChoice()))


def build_model(cfg: Config, ctx: ParallelContext, ds_config: dict[str, Any]) -> nn.Module:
    """The pp=1 ``GPT`` or, with pp > 1, DeepSpeed's ``PipelineModule`` of the same blocks.

    Under ZeRO-3 the pp=1 model is built inside ``zero.Init``, so no rank ever holds it whole."""
    import deepspeed

    spec = model_spec(cfg, ctx.tensor_parallel)
    full_ac = cfg.parallel.activation_checkpointing == "full"
    if full_ac:
        configure_activation_checkpointing(cfg.parallel, ctx)
    if ctx.pp > 1:
        return build_pipeline_module(cfg.parallel, ctx, spec)
    init: Any = contextlib.nullcontext()
    if cfg.zero_stage == 3:
        init = deepspeed.zero.Init(data_parallel_group=ctx.dp_group, config_dict_or_path=ds_config,
                                   mpu=ctx.mpu(), remote_device=None)
    with init:
        model = GPT(spec)
    if full_ac:
        model.checkpoint_every = cfg.parallel.checkpoint_every
    return model


def build_inference_model(mcfg: ModelConfig, ctx: ParallelContext, pipeline_partition: str = "parameters",
                          task: TaskHeadSpec | None = None) -> nn.Module:
    """Inference mode of ``build_model`` (the inference runtime, ``gpt_dist.inference``): the
    same ``GPT`` or, with pp > 1, the same ``PipelineModule`` stage (with ``task``: GPT-1's
    fine-tuning head on the last stage), without ZeRO partitioning, activation checkpointing
    or an engine (no optimizer state is built), in ``eval()`` (dropout off). The caller loads
    its TP slice of an export (``export.load_state_into_model``)."""
    cfg = Config(model=mcfg, parallel=ParallelConfig(tp=ctx.tp, pp=ctx.pp,
                                                     pipeline_partition=pipeline_partition))  # type: ignore[arg-type]
    spec = dataclasses.replace(model_spec(cfg, ctx.tensor_parallel), task=task)
    if ctx.pp > 1:
        return build_pipeline_module(cfg.parallel, ctx, spec).eval()
    return GPT(spec).eval()


def configure_activation_checkpointing(par: ParallelConfig, ctx: ParallelContext) -> None:
    """DeepSpeed's checkpointing API with our mpu; the RNG tracker (gpt_dist.rng) is the one it
    saves and restores around the recomputation, so dropout masks are identical.

    ``partition_activations`` splits each saved block input over the TP ranks and all-gathers
    it before recomputing; that assumes the input is the same on every TP rank. Under sequence
    parallelism it is not (each rank holds its own sequence slice, already 1/tp of the whole),
    and partitioning would rebuild a mix of the ranks' slices: wrong gradients. So sequence
    parallelism switches it off (Megatron refuses the same combination).
    """
    import deepspeed

    partition = par.partition_activations and not par.sequence_parallel
    deepspeed.checkpointing.configure(
        ctx.mpu(), partition_activations=partition,
        contiguous_checkpointing=False, checkpoint_in_cpu=False, synchronize=False, profile=False)
