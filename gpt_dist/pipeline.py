"""The decoder as DeepSpeed ``PipelineModule``: a flat view of the same blocks (gpt-neox's
``GPT2ModelPipe`` idea, without its tuple protocol).

    layer 0       TiedLayerSpec("embed", Embedding)       tokens [b,s] -> x [s,b,h]
    layer 1..L    LayerSpec(Block, i)                      x -> x
    layer L+1     LayerSpec(FinalNorm)                     GPT-2's ln_f (identity for GPT-1)
    layer L+2     TiedLayerSpec("embed", Embedding, forward_fn=logits)  x -> logits [s,b,V/tp]
    loss_fn       vocab_parallel_cross_entropy(logits, (labels, loss_mask))

    fine-tuning:  layer L+2 returns (logits, x); layer L+3 TaskHeadPipe (GPT-1's W_y) passes
                  them on; loss_fn = TaskHead.objective(logits, x, (labels, loss_mask,
                  extract_pos, task_labels)): the last stage computes both heads.

    e.g. pp=2, n_layer=4, partition by parameters:
      stage 0: embed, h.0, h.1           stage 1: h.2, h.3, ln_f, embed (tied copy)

One activation tensor travels between stages (the causal mask is implicit in SDPA). The
token embedding lives on the first and the last stage; DeepSpeed all-reduces its gradient
over the two and keeps the copies equal. Blocks are built with their global index, so every
parameter is initialised from (seed, GPT-2 name) exactly as in ``GPT``: PP=2 and PP=1 models
from one seed hold the same weights, and ``pipe_name_to_gpt`` maps a pipeline checkpoint's
per-layer names back to GPT-2 names for export.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from torch import nn

from gpt_dist.config import Config
from gpt_dist.model.gpt import Block, Embedding, LayerNorm, ModelSpec, init_task_head, lm_loss, vocab_parallel_logits
from gpt_dist.model.heads import TaskHead
from gpt_dist.parallel import ParallelContext


class EmbeddingPipe(Embedding):
    """First stage: token ids [b, s] -> hidden [s, b, h]; on the last stage, the tied logits."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.vocab_size, self.padded_vocab, self.tp = spec.cfg.vocab_size, spec.padded_vocab, spec.tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(input_ids)


class BlockPipe(Block):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)


class FinalNorm(nn.Module):
    """GPT-2's final LayerNorm as its own pipeline layer (identity for GPT-1)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.ln_f = (LayerNorm(spec.cfg.n_embd, spec.cfg.ln_eps, spec.sequence_parallel)
                     if spec.cfg.arch == "gpt2" else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x) if self.ln_f is not None else x


def _tied_logits(embed: Embedding, x: torch.Tensor) -> torch.Tensor:
    """Last stage: hidden [s, b, h] -> vocab-parallel logits [s, b, V/tp] with the tied wte."""
    return vocab_parallel_logits(x, embed.wte.weight, embed.vocab_size, embed.padded_vocab, embed.tp,
                                 embed.sequence_parallel)


def _tied_logits_and_hidden(embed: Embedding, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _tied_logits(embed, x), x


def _loss(logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor], fused: bool = False) -> torch.Tensor:
    target, loss_mask = labels
    return lm_loss(logits, target, loss_mask, fused=fused)  # fused: kernels.cross_entropy, streamed


class TaskHeadPipe(TaskHead):
    """GPT-1's W_y on the last stage: passes (logits, hidden) on; ``TaskLoss`` applies it."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec.cfg.n_embd, spec.task, spec.sequence_parallel,
                         init=lambda lin: init_task_head(lin, spec))

    def forward(self, *outputs: Any) -> Any:  # type: ignore[override]
        """DeepSpeed unpacks a tuple activation into arguments: (logits, hidden) -> the same."""
        return outputs if len(outputs) > 1 else outputs[0]


class TaskLoss:
    """The pipeline's loss function under fine-tuning: ``TaskHead.objective`` of the last
    stage's head. DeepSpeed's engine keeps only the scalar loss, so the parts ([L1, L2]) and
    task logits of each micro-batch are kept in ``records`` for the objective to read."""

    def __init__(self) -> None:
        self.head: TaskHead | None = None
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, outputs: tuple[torch.Tensor, torch.Tensor], labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        assert self.head is not None, "TaskLoss called on a stage without the task head"
        logits, hidden = outputs
        lm_labels, lm_mask, extract_pos, task_labels = labels
        loss, parts, task_logits = self.head.objective(logits, hidden, lm_labels, lm_mask, extract_pos, task_labels)
        self.records.append((parts, task_logits, task_labels.detach()))
        return loss


def build_pipeline_module(cfg: Config, ctx: ParallelContext, spec: ModelSpec) -> Any:
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    task = spec.task is not None
    layers = [TiedLayerSpec("embed", EmbeddingPipe, spec, tied_weight_attr="wte.weight")]
    layers += [LayerSpec(BlockPipe, spec, i) for i in range(cfg.model.n_layer)]
    layers += [LayerSpec(FinalNorm, spec),
               TiedLayerSpec("embed", EmbeddingPipe, spec,
                             forward_fn=_tied_logits_and_hidden if task else _tied_logits,
                             tied_weight_attr="wte.weight")]
    loss_fn: Any = functools.partial(_loss, fused=spec.kernels.cross_entropy)
    if task:
        layers.append(LayerSpec(TaskHeadPipe, spec))
        loss_fn = TaskLoss()
    # DeepSpeed checkpoints chunks of `interval` consecutive layers of a stage. Only chunks made
    # of blocks: DeepSpeed's (reentrant) checkpoint gives no gradient to a chunk whose input does
    # not require one, i.e. one that starts with the embedding on the first stage.
    interval = cfg.parallel.checkpoint_every if cfg.parallel.activation_checkpointing == "full" else 0
    module = PipelineModule(layers=layers, loss_fn=loss_fn, topology=ctx.topology,
                            partition_method=cfg.parallel.pipeline_partition,
                            activation_checkpoint_interval=interval,
                            checkpointable_layers=["BlockPipe"])
    if task:
        heads = [f for f in module.forward_funcs if isinstance(f, TaskHeadPipe)]
        loss_fn.head = heads[0] if heads else None
    return module


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
