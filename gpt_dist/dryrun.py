"""``--dry-run``: what a launch would do, computed on one CPU with no process group.

``dry_run(cfg, nodes, gpus_per_node)`` validates the config for ``world = nodes *
gpus_per_node`` and returns a report: the rank grid (global rank -> node, local rank,
(pp, dp, tp)), the layers and parameters of each pipeline stage, the generated DeepSpeed
JSON, the batch arithmetic, which engine and schedule run the pipeline and its bubble, an
estimate of memory per GPU, and the data-parallel communication per step.

Stages hold the layers DeepSpeed's ``PipelineModule`` gives them (``parallel.pipeline_partition``,
computed with DeepSpeed's own partitioner on the per-TP-rank parameter counts it uses), and
ZeRO partitions over the stage's data-parallel group (``N`` ranks) under both pipeline engines.

Memory conventions (bytes per parameter held by a rank):

* weights: 2 (bf16/fp16) or 4 (fp32); sharded over N under ZeRO-3.
* gradients: 2 (bf16/fp16) or 4 (fp32), sharded over N under ZeRO-2/3; with mixed
  precision DeepSpeed's ZeRO/bf16 optimizers also keep a 4-byte fp32 gradient partition
  next to the fp32 master weights (sharded from ZeRO-1 on), counted here as gradients.
* optimizer: Adam fp32 master + m + v = 12 (mixed precision) or m + v = 8 (fp32, the
  weights are the master); sharded over N from ZeRO-1 on.
* ZeRO-3's gathered working set: ZeRO-3 gathers parameters module by module (each Linear,
  each embedding), so one module's weights and, in the backward, its full gradient before
  the reduce-scatter are whole at a time: 2 x (2 or 4) bytes x the stage's largest module
  (the word-embedding shard on the first and last stage, the MLP's ``c_fc`` in between).

This is DeepSpeed's own accounting (``estimate_zero2_model_states_mem_needs``: 2P + 18P/N
with 18 = 2 bf16 grads + 4 fp32 grads + 4 fp32 params + 8 moments;
``estimate_zero3_model_states_mem_needs``: 4 x the largest layer gathered); tests/cluster/
test_dryrun.py checks the figures against its estimators. Other temporary buffers (bucketed
reductions, ZeRO-3's prefetch of up to ``stage3_prefetch_bucket_size`` parameters, the
allocator's fragmentation) are not counted.

Communication per step, per rank, for ring collectives over the stage's dp group (an
all-gather or reduce-scatter of S bytes sends S(N-1)/N from each rank, an all-reduce twice
that), M micro-batches per step, gradients in the training dtype:

* ZeRO-0: one all-reduce of the gradients;
* ZeRO-1: one reduce-scatter of the gradients (in ``step()``) and one all-gather of the
  updated 16-bit weights: an all-reduce's volume;
* ZeRO-2: a reduce-scatter of the gradients after every micro-batch's backward (M) and one
  all-gather of the updated weights;
* ZeRO-3: every micro-batch gathers the stage's weights in its forward and again in its
  backward (2M all-gathers) and reduce-scatters its gradients (M); nothing after the step.
  An upper bound: ZeRO-3 keeps a module gathered between two uses fewer than
  ``stage3_max_reuse_distance`` parameters apart (while its prefetch trace holds), and
  parameters under ``stage3_param_persistence_threshold`` (biases, LayerNorms) for good.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from gpt_dist.config import Config, KernelChoice, ModelConfig, ParallelConfig, bubble_fraction, validate
from gpt_dist.model.gpt import analytic_parameters
from gpt_dist.training.engine import deepspeed_config

GB = 1e9


@dataclass
class Layer:
    """One entry of the pipeline's layer list (``pipeline.build_pipeline_module``), counted as
    DeepSpeed's partitioner counts it: the parameters one TP rank builds."""

    kind: str
    """``embedding``, ``block``, ``ln_f`` or ``tied embedding`` (the output layer's copy)."""
    type_name: str
    """The ``LayerSpec``'s class name, which ``pipeline_partition: type:...`` matches."""
    total: int
    per_rank: int
    largest: int
    """Parameters (one TP rank's) of its largest module: what ZeRO-3 gathers at once."""


@dataclass
class StageParams:
    stage: int
    layers: int
    """Transformer blocks on the stage."""
    total: int
    """Distinct parameters of the stage (TP-replicated ones once; the tied copy counted again)."""
    per_rank: int
    """Parameters one TP rank of the stage holds."""
    largest: int = 0
    """One TP rank's parameters of the stage's largest module (ZeRO-3's gathered unit)."""
    kinds: list[str] = field(default_factory=list)
    """What the stage holds besides blocks (``embedding``, ``ln_f``, ``tied embedding``)."""

    def describe(self) -> str:
        first = [k for k in self.kinds if k == "embedding"]
        last = [k for k in self.kinds if k != "embedding"]
        return " + ".join(first + [f"{self.layers} blocks"] + last)


def coords_of(rank: int, tp: int, pp: int, dp: int) -> tuple[int, int, int]:
    """(pp, dp, tp) of ``rank``: global_rank = pp*(dp*tp) + dp*tp + tp (gpt_dist.parallel)."""
    return rank // (tp * dp), (rank // tp) % dp, rank % tp


def model_layers(model: ModelConfig, parallel: ParallelConfig) -> list[Layer]:
    """The decoder's layers in pipeline order, with their parameters per TP rank.

    Embedding: word embedding (padded vocabulary, vocab-parallel /tp) + positions
    (replicated). Inside a block the column-parallel QKV/fc weights+biases and the
    row-parallel weights are /tp, the row-parallel biases and the two LayerNorms are
    replicated on every TP rank. GPT-2 ends with ``ln_f``. When pp > 1 the last stage builds
    the whole embedding module again (``TiedLayerSpec``) for the tied output layer: its
    positions are built (and held by the optimizer) though never used.
    """
    m, tp = model, parallel.tp
    h, vocab = m.n_embd, m.padded_vocab_size(tp)
    if m.bias:
        sharded_block = 12 * h * h + 7 * h       # qkv W+b (3h^2+3h), proj W, fc W+b (4h^2+4h), out W
        replicated_block = 2 * h + 4 * h         # proj/out biases, ln_1, ln_2 (weight+bias)
    else:
        sharded_block, replicated_block = 12 * h * h, 4 * h
    c_fc = (4 * h * h + (4 * h if m.bias else 0)) // tp
    wte, wpe = vocab * h, m.n_ctx * h

    def embedding(kind: str) -> Layer:
        return Layer(kind, "EmbeddingPipe", wte + wpe, wte // tp + wpe, max(wte // tp, wpe))

    layers = [embedding("embedding")]
    layers += [Layer("block", "BlockPipe", sharded_block + replicated_block,
                     sharded_block // tp + replicated_block, c_fc)] * m.n_layer
    final_ln = 2 * h if m.arch == "gpt2" else 0   # GPT-1's head holds no weight: a 0-parameter layer
    layers.append(Layer("ln_f", "LMHeadPipe", final_ln, final_ln, final_ln))
    if parallel.pp > 1:
        layers.append(embedding("tied embedding"))
    return layers


def partition_bounds(layers: list[Layer], pp: int, method: str) -> list[int]:
    """Stage boundaries in ``layers`` (stage s holds ``layers[b[s]:b[s+1]]``) by DeepSpeed's
    own partitioner, fed what ``PipelineModule._partition_layers`` feeds it: the per-rank
    parameter counts (``parameters``), the layer count (``uniform``) or 1 for each layer whose
    class name matches (``type:<regex>``)."""
    if pp == 1:
        return [0, len(layers)]
    from deepspeed.runtime.utils import partition_balanced, partition_uniform

    method = method.lower()
    if method == "uniform":
        parts = partition_uniform(num_items=len(layers), num_parts=pp)
    elif method == "parameters":
        parts = partition_balanced(weights=[x.per_rank for x in layers], num_parts=pp)
    else:
        pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
        parts = partition_balanced(weights=[1 if pattern.search(x.type_name) else 0 for x in layers], num_parts=pp)
    return [int(b) for b in parts]


def stage_parameters(model: ModelConfig, parallel: ParallelConfig) -> list[StageParams]:
    """Parameters per pipeline stage and per TP rank of that stage (``model_layers`` split by
    ``partition_bounds``)."""
    layers = model_layers(model, parallel)
    bounds = partition_bounds(layers, parallel.pp, parallel.pipeline_partition)
    out = []
    for s in range(parallel.pp):
        part = layers[bounds[s]:bounds[s + 1]]
        out.append(StageParams(s, sum(x.kind == "block" for x in part), sum(x.total for x in part),
                               sum(x.per_rank for x in part), max((x.largest for x in part), default=0),
                               [x.kind for x in part if x.kind != "block" and x.total]))
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


def zero3_gathered_bytes(largest: int, precision: str) -> float:
    """ZeRO-3's working set on top of the shards: one module's weights gathered whole and, in
    the backward, its whole gradient before the reduce-scatter, for the stage's largest
    module (``StageParams.largest``); DeepSpeed's estimator counts the same 4 bytes x the
    largest layer in 16-bit."""
    return 2 * largest * (2 if precision in ("bf16", "fp16") else 4)


@dataclass
class Collective:
    """A data-parallel collective a rank of a stage runs ``count`` times per step."""

    what: str
    count: int
    bytes_per_rank: float
    """Bytes each rank sends per call (ring algorithm over the dp group)."""

    @property
    def total(self) -> float:
        return self.count * self.bytes_per_rank


def dp_communication(params: int, dp: int, micro_batches: int, *, zero_stage: int,
                     precision: str) -> list[Collective]:
    """The data-parallel collectives per optimizer step of a rank holding ``params``
    parameters (its stage's, per TP rank) under ``zero_stage`` (module docstring): an
    all-gather or reduce-scatter of S bytes over N ranks sends S(N-1)/N per rank."""
    if dp == 1:
        return []
    size = params * (2 if precision in ("bf16", "fp16") else 4)
    ring = size * (dp - 1) / dp
    m = micro_batches
    if zero_stage == 0:
        return [Collective("all-reduce of the gradients", 1, 2 * ring)]
    if zero_stage == 1:
        return [Collective("reduce-scatter of the gradients", 1, ring),
                Collective("all-gather of the updated weights", 1, ring)]
    if zero_stage == 2:
        return [Collective("reduce-scatter of the gradients (every micro-batch)", m, ring),
                Collective("all-gather of the updated weights", 1, ring)]
    return [Collective("all-gather of the weights in the forward (every micro-batch)", m, ring),
            Collective("all-gather of the weights in the backward (every micro-batch)", m, ring),
            Collective("reduce-scatter of the gradients (every micro-batch)", m, ring)]


def in_flight(cfg: Config, stage: int, micro_batches: int) -> int:
    """Micro-batches whose activations a stage holds at once: 1F1B (both engines) keeps
    ``pp - stage`` (its warm-up forwards + 1), GPipe all of them."""
    p = cfg.parallel
    if p.pp == 1:
        return 1
    if cfg.staged_pipeline and p.pipeline_schedule == "gpipe":
        return micro_batches
    return min(p.pp - stage, micro_batches)


def pipeline_line(cfg: Config, dp: int, micro_batches: int) -> str:
    """Which engine runs the pipeline and with which schedule."""
    p = cfg.parallel
    if p.pp == 1:
        return "pipeline: none (pp=1)"
    if cfg.staged_pipeline:
        return (f"pipeline: pp={p.pp}, {micro_batches} micro-batches per step; engine 'stages' (one DeepSpeed "
                f"engine per stage, ZeRO-{cfg.zero_stage} over the stage's dp group of {dp}: "
                f"gpt_dist/training/stages.py); schedule {p.pipeline_schedule} (torch.distributed.pipelining)")
    return (f"pipeline: pp={p.pp}, {micro_batches} micro-batches per step; engine 'deepspeed' (DeepSpeed's "
            f"PipelineEngine, ZeRO-{cfg.zero_stage} over the stage's dp group of {dp}); schedule 1f1b (DeepSpeed's)")


def planned_kernels(cfg: Config) -> KernelChoice:
    """The kernels the planned launch runs: ``training.device`` cpu plans a CPU job, auto and
    cuda a GPU one (with Triton there: the dry run plans for another machine)."""
    device = "cpu" if cfg.training.device == "cpu" else "cuda"
    return cfg.kernels.resolve(device, cfg.training.precision, attn_dropout=cfg.model.attn_dropout,
                               offload=cfg.optimizer_offloaded, plan=True)


def activation_bytes(cfg: Config, micro_batch: int | None = None,
                     kernels: KernelChoice | None = None, layers: int | None = None) -> tuple[float, str]:
    """Activation bytes of ONE micro-batch on one rank of a pipeline stage of ``layers`` blocks
    (default n_layer/pp), and the formula used, for the kernels that will run
    (``planned_kernels`` by default).

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
    layers = layers if layers is not None else m.n_layer // p.pp
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
        add(f"  stage {st.stage}: {st.describe()}, {_fmt(st.total)} in the stage, "
            f"{_fmt(st.per_rank)} per TP rank")
    if p.pp > 1:
        add(f"  (pipeline_partition '{p.pipeline_partition}': DeepSpeed's partitioner on the per-rank counts)")
    add("")
    add("deepspeed config:")
    out.extend("  " + line for line in json.dumps(deepspeed_config(cfg, world), indent=2).splitlines())
    add("")
    seq = cfg.sequence_length
    tokens = t.global_batch_size * seq
    add(f"batch: micro {t.micro_batch_size} x accum {accum} x dp {dp} = global {t.global_batch_size} "
        f"sequences; x seq_len {seq} = {tokens:,} tokens per step; "
        f"{tokens * t.train_steps / 1e9:.2f}B tokens in {t.train_steps} steps")
    add(pipeline_line(cfg, dp, accum))
    schedule = p.pipeline_schedule if cfg.staged_pipeline else "1f1b"
    add(f"pipeline bubble ({schedule}): (pp-1)/(m+pp-1) = {bubble_fraction(p.pp, accum):.3f}")
    add("")
    out.extend(memory_lines(cfg, stages, dp, accum))
    add("")
    out.extend(communication_lines(cfg, stages, dp, accum))
    add("")
    add(resume_line(cfg, world))
    return "\n".join(out)


def memory_lines(cfg: Config, stages: list[StageParams], dp: int, accum: int) -> list[str]:
    """Memory per GPU of each stage: model states (ZeRO over the stage's dp group), ZeRO-3's
    gathered module, the activations in flight and the output layer."""
    p, t, zero = cfg.parallel, cfg.training, cfg.zero_stage
    where = f"the stage's dp group of {dp}" if p.pp > 1 else f"dp={dp}"
    out = [f"memory per GPU (GB, model states of the rank's stage under ZeRO-{zero} over {where}):"]
    kernels = planned_kernels(cfg)
    head, head_formula = output_layer_bytes(cfg, kernels=kernels)
    formula = ""
    for st in stages:
        mem = memory_per_gpu(st.per_rank, dp, zero_stage=zero, precision=t.precision)
        act, formula = activation_bytes(cfg, kernels=kernels, layers=st.layers)
        n = in_flight(cfg, st.stage, accum)
        out_layer = head if st.stage == p.pp - 1 else 0.0
        gathered = zero3_gathered_bytes(st.largest, t.precision) if zero == 3 else 0.0
        total = mem["model_states"] + (gathered + act * n + out_layer) / GB
        out.append(f"  stage {st.stage}: weights {mem['weights']:.2f}  gradients {mem['gradients']:.2f}  "
                   f"optimizer {mem['optimizer']:.2f}  = {mem['model_states']:.2f};  "
                   + (f"gathered {gathered / GB:.2f};  " if zero == 3 else "")
                   + f"activations {act / GB:.2f}/micro-batch x {n} in flight"
                   + (f" + output layer {out_layer / GB:.2f}" if out_layer else "")
                   + f" = {total:.2f} total")
    if zero == 3:
        out.append(f"  ZeRO-3: weights, gradients and optimizer state are each 1/{dp} of the stage's; "
                   "gathered = one module's weights + its gradient whole at a time (the largest: "
                   + ", ".join(f"stage {st.stage} {_fmt(st.largest)}" for st in stages) + " per TP rank)")
    out.append(f"  activations: {formula} (Korthikanti et al. 2022; s={cfg.sequence_length} "
               f"b={t.micro_batch_size}); buffers, fragmentation and the CUDA context are extra")
    out.append(f"  output layer: {head_formula}")
    out.append(f"  kernels: {', '.join(kernels.names_on()) or 'none (the reference path)'}")
    return out


def communication_lines(cfg: Config, stages: list[StageParams], dp: int, accum: int) -> list[str]:
    """Data-parallel bytes per step each rank sends (``dp_communication``), per stage; under
    ZeRO-2/3 next to what ZeRO-1 would send."""
    zero, precision = cfg.zero_stage, cfg.training.precision
    if dp == 1:
        return ["data-parallel communication per step: none (dp=1)"]
    out = [(f"data-parallel communication per step (GB each rank sends over its dp group of {dp}, "
            f"ring collectives, M={accum} micro-batches):")]
    calls = dp_communication(stages[0].per_rank, dp, accum, zero_stage=zero, precision=precision)
    out.append(f"  ZeRO-{zero}: " + " + ".join(f"{c.count} x {c.what}" for c in calls)
               + ("; at most: modules reused soon stay gathered (stage3_max_reuse_distance)" if zero == 3 else ""))
    for st in stages:
        calls = dp_communication(st.per_rank, dp, accum, zero_stage=zero, precision=precision)
        sent = sum(c.total for c in calls)
        line = (f"  stage {st.stage}: " + " + ".join(f"{c.count} x {c.bytes_per_rank / GB:.2f}" for c in calls)
                + f" = {sent / GB:.2f} GB")
        if zero >= 2:
            base = sum(c.total for c in dp_communication(st.per_rank, dp, accum, zero_stage=1, precision=precision))
            line += f";  ZeRO-1 would send {base / GB:.2f} GB (ZeRO-{zero}: {sent / base:.1f}x that)"
        out.append(line)
    return out


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
