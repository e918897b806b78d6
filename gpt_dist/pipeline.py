"""The decoder as DeepSpeed ``PipelineModule``: a flat view of the same blocks (gpt-neox's
``GPT2ModelPipe`` idea, without its tuple protocol).

    layer 0       TiedLayerSpec("embed", EmbeddingPipe)   tokens [b,s] -> x [s,b,h]
    layer 1..L    LayerSpec(BlockPipe, i)                  x -> x
    layer L+1     LayerSpec(LMHeadPipe)                    the model's LMHead: h_L = ln_f(x) (GPT-2)
    layer L+2     TiedLayerSpec("embed", forward_fn=_with_wte)   h_L -> (h_L, wte of the tied copy)
    loss_fn       LMLoss: the same ``LMHead.loss`` as the plain model (fused CE or logits + CE)

    fine-tuning:  layer L+3 TaskHeadPipe (GPT-1's W_y) passes (h_L, wte) on; loss_fn = TaskLoss:
                  ``TaskHead.objective(LMHead.logits(h_L, wte), h_L, ...)``: the last stage
                  computes both heads.

    e.g. pp=2, n_layer=4, partition by parameters:
      stage 0: embed, h.0, h.1           stage 1: h.2, h.3, ln_f, embed (tied copy)

One activation tensor travels between stages (the causal mask is implicit in SDPA). The
token embedding lives on the first and the last stage; DeepSpeed all-reduces its gradient
over the two and keeps the copies equal. Blocks are built with their global index, so every
parameter is initialised from (seed, GPT-2 name) exactly as in ``GPT``: PP=2 and PP=1 models
from one seed hold the same weights, and ``pipe_name_to_gpt`` maps a pipeline checkpoint's
per-layer names back to GPT-2 names for export. The layers' forwards take the same optional
arguments as the plain model's (position offset, KV cache), so the inference runtime runs a
stage through the same interface as a whole ``GPT``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import torch

from gpt_dist.config import ParallelConfig
from gpt_dist.deepspeed_compat import pipeline_layers, pipeline_loss_fn, prepare_pipeline_forward
from gpt_dist.model.gpt import GPT, Block, Embedding, LMHead, ModelSpec, init_task_head
from gpt_dist.model.heads import TaskHead
from gpt_dist.model.kv_cache import KVCache
from gpt_dist.parallel import ParallelContext


class EmbeddingPipe(Embedding):
    """First stage: token ids [b, s] -> hidden [s, b, h]; on the last stage, the tied wte."""

    def forward(self, input_ids: torch.Tensor, position_offset: int | torch.Tensor = 0) -> torch.Tensor:
        return super().forward(input_ids, position_offset)


class BlockPipe(Block):
    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        return super().forward(x, kv_cache)


class LMHeadPipe(LMHead):
    """The model's ``LMHead`` as the last stage's layer: its forward is the final norm; the
    loss (``LMLoss``) and inference call its ``logits``/``loss`` with the tied copy's wte."""

    def forward(self, x: torch.Tensor, wte: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return self.norm(x)


def _with_wte(embed: Embedding, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Last stage: h_L -> (h_L, the tied wte shard) for the loss function."""
    return hidden, embed.wte.weight


class LMLoss:
    """The pipeline's loss function: ``LMHead.loss`` of the last stage's head, so the fused
    cross-entropy switch runs the same kernel as at pp=1."""

    def __init__(self) -> None:
        self.head: LMHead | None = None

    def __call__(self, outputs: tuple[torch.Tensor, torch.Tensor], labels: tuple[torch.Tensor, torch.Tensor]
                 ) -> torch.Tensor:
        assert self.head is not None, "LMLoss called on a stage without the LM head"
        hidden, wte = outputs
        target, loss_mask = labels
        return self.head.loss(hidden, wte, target, loss_mask)


class TaskHeadPipe(TaskHead):
    """GPT-1's W_y on the last stage: passes (h_L, wte) on; ``TaskLoss`` applies it."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec.cfg.n_embd, spec.task, spec.tp_group, spec.sequence_parallel,
                         init=lambda lin: init_task_head(lin, spec))

    def forward(self, *outputs: Any) -> Any:  # type: ignore[override]
        """A tuple activation may arrive unpacked into arguments: (h_L, wte) -> the same."""
        return outputs if len(outputs) > 1 else outputs[0]


class TaskLoss:
    """The pipeline's loss function under fine-tuning: ``TaskHead.objective`` of the last
    stage's head. DeepSpeed's engine keeps only the scalar loss, so the parts ([L1, L2]) and
    task logits of each micro-batch are kept in ``records`` for the objective to read."""

    def __init__(self) -> None:
        self.head: TaskHead | None = None
        self.lm_head: LMHead | None = None
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, outputs: tuple[torch.Tensor, torch.Tensor], labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        assert self.head is not None and self.lm_head is not None, "TaskLoss called on a stage without the heads"
        hidden, wte = outputs
        lm_labels, lm_mask, extract_pos, task_labels = labels
        logits = self.lm_head.logits(hidden, wte)
        loss, parts, task_logits = self.head.objective(logits, hidden, lm_labels, lm_mask, extract_pos, task_labels)
        self.records.append((parts, task_logits, task_labels.detach()))
        return loss


def build_pipeline_module(par: ParallelConfig, ctx: ParallelContext, spec: ModelSpec) -> Any:
    """DeepSpeed's ``PipelineModule`` of the spec's blocks (the layer count is the spec's model
    section); ``par`` gives the partition method and the activation-checkpointing interval."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    task = spec.task is not None
    layers = [TiedLayerSpec("embed", EmbeddingPipe, spec, tied_weight_attr="wte.weight")]
    layers += [LayerSpec(BlockPipe, spec, i) for i in range(spec.cfg.n_layer)]
    layers += [LayerSpec(LMHeadPipe, spec),
               TiedLayerSpec("embed", EmbeddingPipe, spec, forward_fn=_with_wte, tied_weight_attr="wte.weight")]
    loss_fn: LMLoss | TaskLoss = LMLoss()
    if task:
        layers.append(LayerSpec(TaskHeadPipe, spec))
        loss_fn = TaskLoss()
    # DeepSpeed checkpoints chunks of `interval` consecutive layers of a stage. Only chunks made
    # of blocks: DeepSpeed's (reentrant) checkpoint gives no gradient to a chunk whose input does
    # not require one, i.e. one that starts with the embedding on the first stage.
    interval = par.checkpoint_every if par.activation_checkpointing == "full" else 0
    # Built under no_grad: DeepSpeed broadcasts the tied weights in place at construction
    # (``_synchronize_tied_weights``), which autograd would otherwise record on the parameter
    # as an op without a backward ("c10d::broadcast_: an autograd kernel was not registered",
    # warned at every backward through the tied copy). Parameters still require grad.
    with torch.no_grad():
        module = PipelineModule(layers=layers, loss_fn=loss_fn, topology=ctx.topology,
                                partition_method=par.pipeline_partition,
                                activation_checkpoint_interval=interval,
                                checkpointable_layers=["BlockPipe"])
    funcs = pipeline_layers(module)
    lm_heads = [f for f in funcs if isinstance(f, LMHeadPipe)]
    if isinstance(loss_fn, TaskLoss):
        heads = [f for f in funcs if isinstance(f, TaskHeadPipe)]
        loss_fn.head = heads[0] if heads else None
        loss_fn.lm_head = lm_heads[0] if lm_heads else None
    else:
        loss_fn.head = lm_heads[0] if lm_heads else None
    return module


class StageModule(torch.nn.Module):
    """This rank's ``PipelineModule`` stage as a plain module, for a DeepSpeed engine of its own
    (the pipeline under ZeRO-2/3, ``gpt_dist.training.stages``; DeepSpeed's pipeline engine
    refuses ZeRO-2/3).

    The same layers under the same parameter names (the stage's children are registered here,
    not the ``PipelineModule`` itself), so checkpoints, the layout-free state and export map
    names exactly as for the pipeline engine. On the last stage ``forward`` also applies the
    loss function: under ZeRO-3 the tied ``wte`` is gathered only inside the engine's forward,
    so the loss cannot be computed outside it as DeepSpeed's pipeline engine does.

        first / middle stage:  x [b,s] tokens or [s,b,h] -> [s,b,h]
        last stage:            x [s,b,h], labels... -> scalar loss (``LMLoss``/``TaskLoss``)
    """

    def __init__(self, pipe: Any, is_last: bool) -> None:
        super().__init__()
        object.__setattr__(self, "pipe", pipe)  # not a child: its children are ours
        for name, child in pipe.named_children():
            self.add_module(name, child)
        self.is_last = is_last
        prepare_pipeline_forward(pipe)

    def train(self, mode: bool = True) -> StageModule:
        self.pipe.training = mode
        return super().train(mode)

    def forward(self, x: torch.Tensor, **labels: torch.Tensor) -> torch.Tensor:
        out = self.pipe(x)
        if not self.is_last:
            return out
        return pipeline_loss_fn(self.pipe)(out, tuple(labels[k] for k in sorted(labels)))


@dataclass
class StageParts:
    """This rank's part of the model as the inference runtime runs it, the same for a whole
    ``GPT`` (every part present) and a pipeline stage: the embedding on the first stage, the
    blocks, the LM head and the tied output weight on the last stage."""

    embed: Embedding | None
    blocks: list[Block]
    head: LMHead | None
    wte: torch.Tensor | None
    task_head: TaskHead | None = None


def stage_parts(model: Any) -> StageParts:
    """``StageParts`` of a ``GPT`` or of this rank's ``PipelineModule`` stage."""
    if isinstance(model, GPT):
        return StageParts(model.embed, list(model.h), model.head, model.embed.wte.weight, model.task_head)
    layers = pipeline_layers(model)
    embeds = [f for f in layers if isinstance(f, EmbeddingPipe)]
    heads = [f for f in layers if isinstance(f, LMHeadPipe)]
    tied = [f for f in layers if isinstance(f, functools.partial) and f.func is _with_wte]
    tasks = [f for f in layers if isinstance(f, TaskHeadPipe)]
    return StageParts(embeds[0] if embeds else None, [f for f in layers if isinstance(f, BlockPipe)],
                      heads[0] if heads else None, tied[0].args[0].wte.weight if tied else None,
                      tasks[0] if tasks else None)


def pipe_name_to_gpt(layer_idx: int, local_name: str, n_layer: int) -> str | None:
    """Map DeepSpeed's ``layer_XX`` + local parameter name to the GPT-2 name (None: tied copy)."""
    if layer_idx == 0:
        return local_name                                   # wte.weight, wpe.weight
    if 1 <= layer_idx <= n_layer:
        return f"h.{layer_idx - 1}.{local_name}"
    if layer_idx == n_layer + 1:
        return local_name.replace("ln_f.", "head.ln_f.")    # GPT's LMHead holds ln_f
    if layer_idx == n_layer + 3:
        return "task_head." + local_name                    # fine-tuning: W_y
    return None                                             # the tied embedding on the last stage


def gpt_name_to_pipe(name: str, n_layer: int) -> tuple[int, str]:
    m = re.match(r"h\.(\d+)\.(.*)", name)
    if m:
        return int(m.group(1)) + 1, m.group(2)
    if name.startswith("head.ln_f."):
        return n_layer + 1, name[len("head."):]
    if name.startswith("task_head."):
        return n_layer + 3, name[len("task_head."):]
    return 0, name
