"""The GPT-1 / GPT-2 decoder on megatron-core's tensor-parallel layers, in one sitting.

Names follow GPT-2 (``wte``, ``wpe``, ``h.N.attn.c_attn``, ``ln_f``) so export is a rename
table. Activations are ``[s, b, h]`` (sequence first) inside the blocks because that is what
megatron-core's layers use for sequence parallelism.

Tensor parallelism (tp ranks)::

    x [s,b,h] --ln--> c_attn (ColumnParallel, no comm) -> qkv [s,b,3h/tp]  (heads split)
              --SDPA causal on the local nh/tp heads--> [s,b,h/tp]
              --> c_proj (RowParallel: all-reduce, or reduce-scatter with SP) -> [s,b,h]
    the MLP is the same: c_fc (Column) -> GELU -> c_proj (Row)

    logits: x -> copy-to-TP (all-reduce in backward) -> x @ wte_local^T -> [s,b,V/tp]
            -> vocab_parallel_cross_entropy: the full-vocabulary logits never meet on one rank

c_attn's output rows are ordered ``(head, {q,k,v}, head_dim)`` (Megatron's layout): a TP
split then gives each rank whole heads, and resharding is a plain concatenation along the
output dimension for every column-parallel weight (export reorders to Hugging Face's q|k|v).

Fused kernels (``gpt_dist/kernels``, switched by the ``kernels`` config section through
``ModelSpec.kernels``) replace the LayerNorms, the MLP's bias + GELU, each sub-block's bias +
dropout + residual add, attention (flash only) and the output layer + loss (chunked CE fused
with the tied embedding); with every switch off this file is the reference path.

GPT-1 (Radford et al. 2018): post-LN blocks ``x = LN(x + f(x))``, no final LN, context 512.
GPT-2 (Radford et al. 2019 §2.3): pre-LN blocks ``x = x + f(LN(x))``, a final LN, residual
projections initialised with std 0.02/sqrt(2 n_layer), context 1024. Both tie the output
layer to the token embedding and use GELU (tanh approximation, as the released weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpt_dist.config import KernelChoice, ModelConfig
from gpt_dist.kernels.attention import flash_attention
from gpt_dist.model.heads import TaskHead, TaskHeadSpec
from gpt_dist.model.kv_cache import KVCache
from gpt_dist.model.lm_head import fused_lm_loss, lm_loss, vocab_parallel_logits
from gpt_dist.model.sequence_parallel import seq_gather, seq_split
from gpt_dist.parallel import TPGroup
from gpt_dist.rng import param_generator, tp_region


def _tp() -> Any:
    from megatron.core import tensor_parallel

    return tensor_parallel


@dataclass
class ModelSpec:
    """What the layers need besides ModelConfig: the TP group, the init seed, the kernels.
    Assembled from config sections in one place, ``gpt_dist.model.build``."""

    cfg: ModelConfig
    tp_group: TPGroup = field(default_factory=TPGroup)
    """The tensor-parallel group (``ParallelContext.tensor_parallel``); size 1: no TP."""
    sequence_parallel: bool = False
    seed: int = 1234
    task: TaskHeadSpec | None = None
    """Fine-tuning: add GPT-1's linear head W_y (``gpt_dist.model.heads``)."""
    kernels: KernelChoice = field(default_factory=KernelChoice)
    """Which fused kernels run (``gpt_dist.kernels``); the default is the reference path."""
    megatron: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from megatron.core import ModelParallelConfig

        # use_cpu_initialization: build each full weight from the seed on every rank, keep
        # this rank's slice. Needed on CPU (the GPU path forks CUDA RNG) and it makes the
        # weights independent of the layout. sequence_parallel stays off inside megatron-core's
        # linears: its sequence mappings allocate on CUDA only, and the project has one
        # sequence-parallel implementation for every device (``sequence_parallel.py``), the
        # one the CPU tests run.
        self.megatron = ModelParallelConfig(
            tensor_model_parallel_size=self.tp,
            sequence_parallel=False,
            use_cpu_initialization=True,
            perform_initialization=True,
            params_dtype=torch.float32,
            gradient_accumulation_fusion=False,
        )

    @property
    def tp(self) -> int:
        return self.tp_group.size

    @property
    def padded_vocab(self) -> int:
        return self.cfg.padded_vocab_size(self.tp)

    def init(self, name: str, std: float) -> Callable[[torch.Tensor], None]:
        """An init method seeded by (seed, parameter name): layout-independent weights."""
        def init_(tensor: torch.Tensor) -> None:
            with torch.no_grad():
                tensor.normal_(0.0, std, generator=param_generator(self.seed, name))
        return init_

    def resid_std(self) -> float:
        if self.cfg.arch == "gpt2":  # GPT-2 §2.3: scale residual projections by 1/sqrt(N)
            return self.cfg.init_std / math.sqrt(2 * self.cfg.n_layer)
        return self.cfg.init_std


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose gradients are summed over TP ranks under sequence parallelism.

    With sequence parallelism each TP rank normalises a different slice of the sequence, so
    each holds a partial gradient of the (replicated) gain and bias. ``copy_to_tensor_model
    _parallel_region`` is identity forward and all-reduce backward: the summed gradient
    reaches the parameter before any DeepSpeed/ZeRO hook sees it, under every ZeRO stage.
    """

    def __init__(self, n: int, eps: float, sequence_parallel: bool, fused: bool = False) -> None:
        super().__init__(n, eps=eps)
        self.sequence_parallel = sequence_parallel  # (then tp > 1: validated with the config)
        self.fused = fused  # kernels.layernorm: the Triton kernel (gpt_dist/kernels/layernorm.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if self.sequence_parallel:
            w, b = _tp().copy_to_tensor_model_parallel_region(w), _tp().copy_to_tensor_model_parallel_region(b)
        if self.fused:
            # Triton: imported only when this kernel is on (TRITON_INTERPRET is read at import; kernels/__init__.py)
            from gpt_dist.kernels.layernorm import layer_norm

            return layer_norm(x, w, b, self.eps)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def _dropout(x: torch.Tensor, p: float, training: bool, split: bool) -> torch.Tensor:
    """Dropout with the same mask on TP ranks for replicated x, different for split x."""
    if not training or p == 0.0:
        return x
    if split:
        with tp_region():
            return F.dropout(x, p, True)
    return F.dropout(x, p, True)


def _bias_dropout_add(y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, p: float,
                      training: bool, split: bool, fused: bool) -> torch.Tensor:
    """``residual + dropout(y + bias)`` (no residual: ``dropout(y + bias)``); ``fused``: one
    Triton kernel whose mask is drawn in the same RNG region as ``_dropout``'s."""
    if fused and residual is not None:
        # Triton: imported only when this kernel is on (TRITON_INTERPRET is read at import; kernels/__init__.py)
        from gpt_dist.kernels.bias_dropout_add import bias_dropout_add

        return bias_dropout_add(y, bias, residual, p, training, tp_region() if split else None)
    if bias is not None:
        y = y + bias
    y = _dropout(y, p, training, split)
    return y if residual is None else residual + y


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, prefix: str) -> None:
        super().__init__()
        cfg, tp = spec.cfg, _tp()
        self.n_head_local = cfg.n_head // spec.tp
        self.head_dim = cfg.head_dim
        self.attn_dropout = cfg.attn_dropout
        self.dropout = cfg.dropout
        self.sequence_parallel, self.tp_group = spec.sequence_parallel, spec.tp_group
        self.flash, self.fused_bda = spec.kernels.flash_attention, spec.kernels.bias_dropout_add
        self.c_attn = tp.ColumnParallelLinear(
            cfg.n_embd, 3 * cfg.n_embd, config=spec.megatron, bias=cfg.bias, gather_output=False,
            disable_grad_reduce=spec.sequence_parallel,  # SP: seq_gather's backward reduce-scatters
            init_method=spec.init(f"{prefix}.c_attn.weight", cfg.init_std))
        self.c_proj = tp.RowParallelLinear(
            cfg.n_embd, cfg.n_embd, config=spec.megatron, bias=cfg.bias, input_is_parallel=True,
            skip_bias_add=True, init_method=spec.init(f"{prefix}.c_proj.weight", spec.resid_std()))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.sequence_parallel:  # [s/tp, b, h] -> [s, b, h]; backward: reduce-scatter
            x = seq_gather(x, self.tp_group, reduce_grad=True)
        qkv, _ = self.c_attn(x)                                  # [s, b, 3h/tp]
        s, b = qkv.shape[0], qkv.shape[1]
        qkv = qkv.view(s, b, self.n_head_local, 3, self.head_dim)  # [s, b, nh/tp, 3, hd]
        q, k, v = (qkv[:, :, :, i].permute(1, 2, 0, 3) for i in range(3))  # [b, nh/tp, s, hd]
        return q, k, v

    def cache_kv(self, x: torch.Tensor, kv_cache: KVCache, layer: int) -> None:
        """Only append x's keys and values to the cache (no attention: nothing reads the output)."""
        _, k, v = self._qkv(x)
        kv_cache.update(layer, k, v)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """-> dropout(attn(x)) [+ residual, when given: fused with the bias and dropout]."""
        q, k, v = self._qkv(x)
        s, b = q.shape[2], q.shape[0]
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)                    # [b, nh/tp, past+s, hd]
        p = self.attn_dropout if self.training else 0.0
        with tp_region():  # each TP rank holds different heads: different dropout masks
            if self.flash and kv_cache is None:  # kernels.flash_attention: flash or an error

                y = flash_attention(q, k, v, p)
            elif kv_cache is None or (k.shape[2] == s and kv_cache.past_lengths is None):
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            else:  # decoding with a cache: query i sees keys up to past + i
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_cache.mask(s, k.shape[2], q.device), dropout_p=p)
        y = y.permute(2, 0, 1, 3).reshape(s, b, self.n_head_local * self.head_dim)  # [s, b, h/tp]
        y, bias = self.c_proj(y)                                 # [s, b, h], all-reduced over TP
        if self.sequence_parallel:  # -> [s/tp, b, h] (an all-reduce and a slice: a reduce-scatter's
            y = seq_split(y, self.tp_group)  # result; RowParallelLinear has no SP mode off CUDA)
        bias = _maybe_tp_copy(bias, self.sequence_parallel) if bias is not None else None
        return _bias_dropout_add(y, bias, residual, self.dropout, self.training, self.sequence_parallel,
                                 self.fused_bda)


def _maybe_tp_copy(t: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """Replicated parameter applied to a sequence-split tensor: sum its gradient over TP."""
    return _tp().copy_to_tensor_model_parallel_region(t) if sequence_parallel else t


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, prefix: str) -> None:
        super().__init__()
        cfg, tp = spec.cfg, _tp()
        self.dropout = cfg.dropout
        self.sequence_parallel, self.tp_group = spec.sequence_parallel, spec.tp_group
        self.fused_gelu, self.fused_bda = spec.kernels.bias_gelu, spec.kernels.bias_dropout_add
        self.c_fc = tp.ColumnParallelLinear(  # fused GELU: the kernel adds the bias
            cfg.n_embd, 4 * cfg.n_embd, config=spec.megatron, bias=cfg.bias, gather_output=False,
            disable_grad_reduce=spec.sequence_parallel,
            skip_bias_add=self.fused_gelu, init_method=spec.init(f"{prefix}.c_fc.weight", cfg.init_std))
        self.c_proj = tp.RowParallelLinear(
            4 * cfg.n_embd, cfg.n_embd, config=spec.megatron, bias=cfg.bias, input_is_parallel=True,
            skip_bias_add=True, init_method=spec.init(f"{prefix}.c_proj.weight", spec.resid_std()))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.sequence_parallel:
            x = seq_gather(x, self.tp_group, reduce_grad=True)
        y, fc_bias = self.c_fc(x)                                # [s, b, 4h/tp]
        if self.fused_gelu:
            # Triton: imported only when this kernel is on (TRITON_INTERPRET is read at import; kernels/__init__.py)
            from gpt_dist.kernels.bias_gelu import bias_gelu

            y = bias_gelu(y, fc_bias)
        else:
            y = F.gelu(y, approximate="tanh")
        y, bias = self.c_proj(y)                                 # [s, b, h]
        if self.sequence_parallel:
            y = seq_split(y, self.tp_group)
        bias = _maybe_tp_copy(bias, self.sequence_parallel) if bias is not None else None
        return _bias_dropout_add(y, bias, residual, self.dropout, self.training, self.sequence_parallel,
                                 self.fused_bda)


class Block(nn.Module):
    """One transformer layer; ``layer_idx`` names its parameters (h.N...) for seeding."""

    def __init__(self, spec: ModelSpec, layer_idx: int) -> None:
        super().__init__()
        cfg = spec.cfg
        self.layer_idx = layer_idx
        self.pre_ln = cfg.arch == "gpt2"
        prefix = f"h.{layer_idx}"
        fused_ln = spec.kernels.layernorm
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.ln_eps, spec.sequence_parallel, fused_ln)
        self.attn = Attention(spec, f"{prefix}.attn")
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.ln_eps, spec.sequence_parallel, fused_ln)
        self.mlp = MLP(spec, f"{prefix}.mlp")
        self.fused_bda = spec.kernels.bias_dropout_add

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        if self.fused_bda:  # the residual add fused into the sub-blocks' bias + dropout
            if self.pre_ln:
                x = self.attn(self.ln_1(x), kv_cache, self.layer_idx, residual=x)
                return self.mlp(self.ln_2(x), residual=x)
            x = self.ln_1(self.attn(x, kv_cache, self.layer_idx, residual=x))
            return self.ln_2(self.mlp(x, residual=x))
        if self.pre_ln:   # GPT-2
            x = x + self.attn(self.ln_1(x), kv_cache, self.layer_idx)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, kv_cache, self.layer_idx))  # GPT-1
        return self.ln_2(x + self.mlp(x))

    def fill_cache(self, x: torch.Tensor, kv_cache: KVCache) -> None:
        """The cache half of ``forward``: this layer's keys and values of x, nothing else. For
        a context whose outputs nobody reads (the last layer of a shared-context fill) this
        skips the attention, the projection and the MLP."""
        self.attn.cache_kv(self.ln_1(x) if self.pre_ln else x, kv_cache, self.layer_idx)


class Embedding(nn.Module):
    """Token (vocab-parallel) + learned position embeddings, dropout; returns [s, b, h]."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        cfg, tp = spec.cfg, _tp()
        self.sequence_parallel, self.tp_group = spec.sequence_parallel, spec.tp_group
        self.dropout = cfg.dropout
        self.wte = tp.VocabParallelEmbedding(
            spec.padded_vocab, cfg.n_embd, config=spec.megatron,
            init_method=spec.init("wte.weight", cfg.init_std))
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.n_embd)
        _init_partitioned(self.wpe.weight, spec.init("wpe.weight", cfg.init_std))

    def forward(self, input_ids: torch.Tensor, position_offset: int | torch.Tensor = 0) -> torch.Tensor:
        """``position_offset``: the first position, or one per row ([b], ``KVCache.offset``)."""
        s = input_ids.shape[1]
        if isinstance(position_offset, torch.Tensor):            # rows continue different pasts
            pos = position_offset.to(input_ids.device)[:, None] + torch.arange(s, device=input_ids.device)
            # only a row's right padding can run past the window (its real positions fit: the
            # caller's check); clamped, it embeds some position, and no real position sees it
            pos = pos.clamp_max(self.wpe.num_embeddings - 1)     # [b, s]
        else:
            pos = torch.arange(position_offset, position_offset + s, device=input_ids.device)[None]
        x = self.wte(input_ids) + self.wpe(pos)                  # [b, s, h]
        x = x.transpose(0, 1).contiguous()                       # [s, b, h]
        if self.sequence_parallel:
            x = seq_split(x, self.tp_group)                      # [s/tp, b, h]
        return _dropout(x, self.dropout, self.training, self.sequence_parallel)


def _init_partitioned(param: nn.Parameter, init: Callable[[torch.Tensor], None]) -> None:
    """Initialise a parameter after its module's ``__init__`` returned.

    Under ZeRO-3's ``zero.Init`` that parameter is already partitioned (its ``.data`` is
    empty), so writing into it directly would silently keep the module's default init: gather
    it, initialise (the same on every rank: seeded by name), re-partition from DP rank 0.
    """
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(param, modifier_rank=0):
            init(param)
    else:
        init(param)


class LMHead(nn.Module):
    """Final LN (GPT-2), the tied output layer and the next-token loss; holds no weight but ln_f.

    The one LM head: ``GPT`` holds one, and the pipeline's last stage holds the same class as
    a layer (``pipeline.LMHeadPipe``), so every kernel switch (fused LayerNorm, fused
    cross-entropy) means the same thing at any pp."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        cfg = spec.cfg
        self.ln_f = (LayerNorm(cfg.n_embd, cfg.ln_eps, spec.sequence_parallel, spec.kernels.layernorm)
                     if cfg.arch == "gpt2" else None)
        self.sequence_parallel, self.tp_group = spec.sequence_parallel, spec.tp_group
        self.vocab_size, self.padded_vocab = cfg.vocab_size, spec.padded_vocab
        self.fused_ce, self.chunk = spec.kernels.cross_entropy, spec.kernels.ce_chunk_tokens

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden state h_L: after ln_f for GPT-2, the last block's output for GPT-1."""
        return self.ln_f(x) if self.ln_f is not None else x

    def logits(self, hidden: torch.Tensor, wte: torch.Tensor) -> torch.Tensor:
        """Normalised hidden [s(/tp), b, h] -> vocab-parallel logits [s, b, V/tp], padding masked."""
        return vocab_parallel_logits(hidden, wte, self.vocab_size, self.padded_vocab, self.tp_group,
                                     self.sequence_parallel)

    def loss(self, hidden: torch.Tensor, wte: torch.Tensor, labels: torch.Tensor,
             loss_mask: torch.Tensor | None) -> torch.Tensor:
        """L1 from the normalised hidden [s(/tp), b, h]: with ``kernels.cross_entropy`` the
        chunked CE fused with the tied output layer (no whole logits), else megatron-core's
        vocabulary-parallel CE over ``logits``."""
        if self.fused_ce:
            return fused_lm_loss(hidden, wte, labels, loss_mask, self.vocab_size, self.chunk, self.tp_group,
                                 self.sequence_parallel)
        return lm_loss(self.logits(hidden, wte), labels, loss_mask)

    def forward(self, x: torch.Tensor, wte: torch.Tensor) -> torch.Tensor:
        """[s, b, h] -> vocab-parallel logits [s, b, V/tp]; padding rows masked out."""
        return self.logits(self.norm(x), wte)


class GPT(nn.Module):
    """The whole decoder (pp=1). The pipeline view in ``pipeline.py`` reuses these blocks.

    Three entry points, by what they return: ``hidden`` (h_L), ``logits`` (inference, with
    an optional KV cache) and ``forward`` (training: the loss, what the DeepSpeed engine calls;
    with a fine-tuning head, ``TaskHead.objective``'s tuple)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = Embedding(spec)
        self.h = nn.ModuleList(Block(spec, i) for i in range(spec.cfg.n_layer))
        self.head = LMHead(spec)
        self.task_head = (TaskHead(spec.cfg.n_embd, spec.task, spec.tp_group, spec.sequence_parallel,
                                   init=lambda lin: init_task_head(lin, spec))
                          if spec.task is not None else None)
        self.checkpoint_every = 0  # set by the trainer: recompute every k-th block
        if spec.kernels.compile:  # in place (nn.Module.compile): parameter names unchanged
            for block in self.h:
                block.compile(backend=spec.kernels.compile_backend)

    def hidden(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """input_ids [b, s] -> h_L [s(/tp), b, h] (after GPT-2's final LN); extends ``kv_cache``."""
        offset = kv_cache.offset if kv_cache is not None else 0
        x = self.embed(input_ids, offset)                        # [s, b, h]
        for i, block in enumerate(self.h):
            if self.checkpoint_every and self.training and i % self.checkpoint_every == 0:
                from deepspeed.runtime.activation_checkpointing import checkpointing

                x = checkpointing.checkpoint(block, x)
            else:
                x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.length += input_ids.shape[1]
        return self.head.norm(x)

    def logits(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """input_ids [b, s] -> vocab-parallel logits [b, s, V/tp] (padding rows masked)."""
        return self.head.logits(self.hidden(input_ids, kv_cache), self.embed.wte.weight).transpose(0, 1)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
                extract_pos: torch.Tensor | None = None, task_labels: torch.Tensor | None = None) -> Any:
        """Training: input_ids and labels [b, s] -> the scalar next-token loss L1.

        With a fine-tuning head (``extract_pos`` [b] and ``task_labels`` [B] then required):
        ``(L3, [L1, L2], task logits [B, n])``, see ``TaskHead.objective``."""
        hidden = self.hidden(input_ids)                          # h_L [s, b, h]
        wte = self.embed.wte.weight
        if self.task_head is None:
            return self.head.loss(hidden, wte, labels, loss_mask)
        if extract_pos is None or task_labels is None:
            raise ValueError("a model with a task head needs extract_pos and task_labels")
        return self.task_head.objective(self.head.logits(hidden, wte), hidden, labels, loss_mask, extract_pos,
                                        task_labels)


def init_task_head(linear: nn.Linear, spec: ModelSpec) -> None:
    """W_y ~ N(0, init_std) seeded by its name, bias 0 (also inside ZeRO-3's ``zero.Init``)."""
    _init_partitioned(linear.weight, spec.init("task_head.linear.weight", spec.cfg.init_std))
    _init_partitioned(linear.bias, lambda t: t.data.zero_())


def count_parameters(model: nn.Module, cfg: ModelConfig, tp: int = 1) -> int:
    """Parameters of the full model (all TP shards), counting only the real vocabulary rows."""
    total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n * (tp if getattr(p, "tensor_model_parallel", False) else 1)
    return total - (cfg.padded_vocab_size(tp) - cfg.vocab_size) * cfg.n_embd


def analytic_parameters(cfg: ModelConfig) -> int:
    """12h^2 + 13h per block, tied wte (real vocab), wpe, final LN for GPT-2."""
    h = cfg.n_embd
    per_block = 12 * h * h + 13 * h if cfg.bias else 12 * h * h + 4 * h
    final_ln = 2 * h if cfg.arch == "gpt2" else 0
    return cfg.vocab_size * h + cfg.n_ctx * h + cfg.n_layer * per_block + final_ln
