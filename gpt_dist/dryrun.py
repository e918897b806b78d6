"""``--dry-run``: what a launch would do, computed on one CPU with no process group.

``dry_run(cfg, nodes, gpus_per_node)`` validates the config for ``world = nodes *
gpus_per_node`` and returns a report: the rank grid (global rank -> node, local rank,
(pp, dp, tp)), parameters in total and per rank for each pipeline stage, the generated
DeepSpeed JSON, the batch arithmetic, the 1F1B bubble and an estimate of memory per GPU.

Memory conventions (bytes per parameter held by a rank, ``N`` = data-parallel size):

* weights: 2 (bf16/fp16) or 4 (fp32); sharded over N under ZeRO-3.
* gradients: 2 (bf16/fp16) or 4 (fp32), sharded over N under ZeRO-2/3; with mixed
  precision DeepSpeed's ZeRO/bf16 optimizers also keep a 4-byte fp32 gradient partition
  next to the fp32 master weights (sharded from ZeRO-1 on), counted here as gradients.
* optimizer: Adam fp32 master + m + v = 12 (mixed precision) or m + v = 8 (fp32, the
  weights are the master); sharded over N from ZeRO-1 on.

This is DeepSpeed's own accounting (``estimate_zero2_model_states_mem_needs``: 2P + 18P/N
with 18 = 2 bf16 grads + 4 fp32 grads + 4 fp32 params + 8 moments); tests/cluster/
test_dryrun.py checks the figures against its estimators. Temporary buffers (bucketed
reductions, ZeRO-3's gathered layer, the allocator's fragmentation) are not counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gpt_dist.config import Config, KernelChoice, ModelConfig, ParallelConfig, bubble_fraction, validate
from gpt_dist.model.gpt import analytic_parameters
from gpt_dist.training.engine import deepspeed_config

GB = 1e9


@dataclass
class StageParams:
    stage: int
    layers: int
    total: int
    """Distinct parameters of the stage (TP-replicated ones once; the tied copy counted again)."""
    per_rank: int
    """Parameters one TP rank of the stage holds."""


def coords_of(rank: int, tp: int, pp: int, dp: int) -> tuple[int, int, int]:
    """(pp, dp, tp) of ``rank``: global_rank = pp*(dp*tp) + dp*tp + tp (gpt_dist.parallel)."""
    return rank // (tp * dp), (rank // tp) % dp, rank % tp


def stage_parameters(model: ModelConfig, parallel: ParallelConfig) -> list[StageParams]:
    """Parameters per pipeline stage and per TP rank of that stage.

    First stage: word embedding (padded vocabulary, vocab-parallel /tp) + positions
    (replicated). Last stage: final LN (GPT-2) and, when pp > 1, the tied copy of the word
    embedding for the output layer. Blocks are split n_layer/pp; inside a block the
    column-parallel QKV/fc weights+biases and the row-parallel weights are /tp, the
    row-parallel biases and the two LayerNorms are replicated on every TP rank.
    """
    m, p = model, parallel
    h, tp, pp = m.n_embd, p.tp, p.pp
    vocab = m.padded_vocab_size(tp)
    layers = m.n_layer // pp
    if m.bias:
        sharded_block = 12 * h * h + 7 * h       # qkv W+b (3h^2+3h), proj W, fc W+b (4h^2+4h), out W
        replicated_block = 2 * h + 4 * h         # proj/out biases, ln_1, ln_2 (weight+bias)
    else:
        sharded_block, replicated_block = 12 * h * h, 4 * h
    final_ln = 2 * h if m.arch == "gpt2" else 0
    out = []
    for s in range(pp):
        shard = layers * sharded_block
        repl = layers * replicated_block
        if s == 0:
            shard += vocab * h
            repl += m.n_ctx * h
        if s == pp - 1:
            repl += final_ln
            if pp > 1:
                shard += vocab * h              # tied output embedding lives on the last stage too
        out.append(StageParams(s, layers, shard + repl, shard // tp + repl))
    return out


def memory_per_gpu(params: int, dp: int, *, zero_stage: int, precision: str) -> dict[str, float]:
    """Model-state bytes (in GB) for a rank holding ``params`` parameters under ZeRO
    ``zero_stage`` (``Config.zero_stage``) and ``training.precision``; see module doc."""
    stage = zero_stage
    mixed = precision in ("bf16", "fp16")
    wbytes = 2 if mixed else 4
    weights = params * wbytes / (dp if stage >= 3 else 1)
    grads = params * wbytes / (dp if stage >= 2 else 1)
    if mixed:
        grads += params * 4 / (dp if stage >= 1 else 1)     # fp32 gradient partition
    opt = params * (12 if mixed else 8) / (dp if stage >= 1 else 1)
    return {"weights": weights / GB, "gradients": grads / GB, "optimizer": opt / GB,
            "model_states": (weights + grads + opt) / GB}


def planned_kernels(cfg: Config) -> KernelChoice:
    """The kernels the planned launch runs: ``training.device`` cpu plans a CPU job, auto and
    cuda a GPU one (with Triton there: the dry run plans for another machine)."""
    device = "cpu" if cfg.training.device == "cpu" else "cuda"
    return cfg.kernels.resolve(device, cfg.training.precision, attn_dropout=cfg.model.attn_dropout,
                               offload=cfg.optimizer_offloaded, plan=True)


def activation_bytes(cfg: Config, micro_batch: int | None = None,
                     kernels: KernelChoice | None = None) -> tuple[float, str]:
    """Activation bytes of ONE micro-batch on one rank of a pipeline stage (the blocks), and
    the formula used, for the kernels that will run (``planned_kernels`` by default).

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
    Models", 16-bit activations, per layer (units of s*b*h bytes):
      no parallelism:               34 + 5*a*s/h
      tensor parallel t:            10 + 24/t + 5*a*s/(h*t)
      tensor + sequence parallel:   (34 + 5*a*s/h) / t
      full recomputation:           2 per stored block input (/t with sequence parallelism or
                                    partitioned activations) + the k live layers of a segment
    The 5*a*s/h term is the s x s attention scores, softmax and its dropout mask. The flash
    kernel (kernels.flash_attention) never stores them: it keeps its output (counted in the
    34) and a float32 log-sum-exp per head and token, 4*a/h. The fused bias-dropout-add on a
    GPU regenerates its masks from a Philox seed: the two 1-byte residual-dropout masks (2 of
    the 10 replicated units) are not stored.
    """
    m, p = cfg.model, cfg.parallel
    k = kernels if kernels is not None else planned_kernels(cfg)
    s, b, h, a, t = cfg.sequence_length, micro_batch or cfg.training.micro_batch_size, m.n_embd, m.n_head, p.tp
    layers = m.n_layer // p.pp
    gpu = cfg.training.device != "cpu"
    rep = 10 - (2 if (k.bias_dropout_add and gpu) else 0)
    attn, attn_txt = (4 * a / h, "4a/h") if k.flash_attention else (5 * a * s / h, "5as/h")
    if p.sequence_parallel:
        per_layer = s * b * h * (rep + 24 + attn) / t
        what = f"sbh({rep}+24+{attn_txt})/t per layer (TP+SP)"
    elif t > 1:
        per_layer = s * b * h * (rep + 24 / t + attn / t)
        what = f"sbh({rep}+24/t+{attn_txt}/t) per layer (TP)"
    else:
        per_layer = s * b * h * (rep + 24 + attn)
        what = f"sbh({rep + 24}+{attn_txt}) per layer"
    if k.flash_attention:
        what += ", flash attention"
    if p.activation_checkpointing == "full":
        every = p.checkpoint_every
        stored = -(-layers // every)
        shard = t if (p.sequence_parallel or p.partition_activations) else 1
        # checkpoint inputs of every k-th block + one segment of k blocks live during recompute
        per = stored * 2 * s * b * h / shard + min(every, layers) * per_layer
        return per, (f"full recompute every {every}: ceil(L/k)*2sbh{'/t' if shard > 1 else ''} "
                     f"+ k layers live at {what}")
    return layers * per_layer, what


def output_layer_bytes(cfg: Config, micro_batch: int | None = None,
                       kernels: KernelChoice | None = None) -> tuple[float, str]:
    """Bytes the tied output layer and its loss hold for one micro-batch (last stage only).

    Reference: the logits [s*b, V/t] in the activation dtype and megatron-core's float32 copy,
    which becomes the softmax kept for the backward (for fp32 the copy is the logits
    themselves). Fused CE (kernels.cross_entropy): one chunk of logits, the input gradient
    [s*b, h] and a float32 gradient of the embedding shard [V/t, h], computed in the forward."""
    m, t = cfg.model, cfg.parallel.tp
    k = kernels if kernels is not None else planned_kernels(cfg)
    tokens = cfg.sequence_length * (micro_batch or cfg.training.micro_batch_size)
    v = m.padded_vocab_size(t) // t
    e = 4 if cfg.training.precision == "fp32" else 2
    if k.cross_entropy:
        chunk = min(tokens, k.ce_chunk_tokens)
        return (chunk * v * e + tokens * m.n_embd * e + v * m.n_embd * 4,
                f"fused CE: {chunk}-token chunk of logits + dx + fp32 dwte")
    return tokens * v * (e + (4 if e == 2 else 0)), "logits + float32 softmax (megatron-core CE)"


def _fmt(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return str(int(n))


def rank_grid(parallel: ParallelConfig, nodes: int, gpus_per_node: int, limit: int = 64) -> list[str]:
    world = nodes * gpus_per_node
    tp, pp = parallel.tp, parallel.pp
    dp = world // (tp * pp)
    lines = [f"{'rank':>6} {'node':>5} {'local':>5}   (pp, dp, tp)"]
    shown = range(world) if world <= limit else list(range(limit // 2)) + list(range(world - limit // 2, world))
    prev = -1
    for r in shown:
        if r != prev + 1:
            lines.append(f"{'...':>6}  ({r - prev - 1} ranks omitted)")
        c = coords_of(r, tp, pp, dp)
        lines.append(f"{r:>6} {r // gpus_per_node:>5} {r % gpus_per_node:>5}   ({c[0]}, {c[1]}, {c[2]})")
        prev = r
    return lines


def dry_run(cfg: Config, nodes: int, gpus_per_node: int) -> str:
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"--nodes/--gpus-per-node must be >= 1, got {nodes}/{gpus_per_node}")
    world = nodes * gpus_per_node
    validate(cfg, world, check_paths=False)
    m, p, t = cfg.model, cfg.parallel, cfg.training
    dp = cfg.dp_size(world)
    accum = cfg.grad_accum_steps(world)
    out: list[str] = []
    add = out.append
    add(f"dry run: {cfg.run.name}  world={world} ({nodes} nodes x {gpus_per_node} GPUs)  "
        f"tp={p.tp} pp={p.pp} dp={dp}  ZeRO-{cfg.zero_stage}  precision={t.precision}")
    add("")
    add("rank grid: global_rank = pp*(dp*tp) + dp*tp + tp")
    out.extend("  " + line for line in rank_grid(p, nodes, gpus_per_node))
    if p.tp > gpus_per_node or gpus_per_node % p.tp:
        add(f"  WARNING: tp={p.tp} does not fit inside a node of {gpus_per_node} GPUs; "
            "TP all-reduces would cross the inter-node network")
    add("")
    stages = stage_parameters(m, p)
    add(f"parameters: {_fmt(analytic_parameters(m))} (real vocab {m.vocab_size}; "
        f"padded to {m.padded_vocab_size(p.tp)} for tp={p.tp})")
    for st in stages:
        add(f"  stage {st.stage}: {st.layers} blocks, {_fmt(st.total)} in the stage, "
            f"{_fmt(st.per_rank)} per TP rank")
    add("")
    add("deepspeed config:")
    out.extend("  " + line for line in json.dumps(deepspeed_config(cfg, world), indent=2).splitlines())
    add("")
    seq = cfg.sequence_length
    tokens = t.global_batch_size * seq
    add(f"batch: micro {t.micro_batch_size} x accum {accum} x dp {dp} = global {t.global_batch_size} "
        f"sequences; x seq_len {seq} = {tokens:,} tokens per step; "
        f"{tokens * t.train_steps / 1e9:.2f}B tokens in {t.train_steps} steps")
    add(f"pipeline bubble (1F1B): (pp-1)/(m+pp-1) = {bubble_fraction(p.pp, accum):.3f}")
    add("")
    add(f"memory per GPU (GB, model states under ZeRO-{cfg.zero_stage} over dp={dp}):")
    kernels = planned_kernels(cfg)
    act, formula = activation_bytes(cfg, kernels=kernels)
    head, head_formula = output_layer_bytes(cfg, kernels=kernels)
    for st in stages:
        mem = memory_per_gpu(st.per_rank, dp, zero_stage=cfg.zero_stage, precision=t.precision)
        in_flight = min(p.pp - st.stage, accum) if p.pp > 1 else 1
        out_layer = head if st.stage == p.pp - 1 else 0.0
        add(f"  stage {st.stage}: weights {mem['weights']:.2f}  gradients {mem['gradients']:.2f}  "
            f"optimizer {mem['optimizer']:.2f}  = {mem['model_states']:.2f};  activations "
            f"{act / GB:.2f}/micro-batch x {in_flight} in flight"
            + (f" + output layer {out_layer / GB:.2f}" if out_layer else "")
            + f" = {mem['model_states'] + (act * in_flight + out_layer) / GB:.2f} total")
    add(f"  activations: {formula} (Korthikanti et al. 2022; s={seq} "
        f"b={t.micro_batch_size}); buffers, fragmentation and the CUDA context are extra")
    add(f"  output layer: {head_formula}")
    add(f"  kernels: {', '.join(kernels.names_on()) or 'none (the reference path)'}")
    add("")
    add(resume_line(cfg, world))
    return "\n".join(out)


def resume_line(cfg: Config, world: int) -> str:
    """What a start at ``world`` ranks would resume: nothing, the checkpoint in its own layout,
    or in a new one (both layouts and what carries over), or why it would be refused. The
    manifest's signature and file sizes are checked; the hashes only at the real start."""
    from gpt_dist.checkpoint_format import CheckpointError
    from gpt_dist.training.reshard import plan_resume

    try:
        plan = plan_resume(cfg, world, check_hash=False)
    except CheckpointError as exc:
        return f"resume: REFUSED: {exc}"
    if plan is None:
        return f"resume: none (no committed checkpoint under {cfg.run_dir}; a fresh start)"
    return plan.describe()
