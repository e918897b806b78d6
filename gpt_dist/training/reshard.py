"""Layout-free training state: a checkpoint written in one parallel layout resumes in any other.

Every committed checkpoint holds, next to DeepSpeed's own per-layout files (which a resume in
the same layout loads, bit-exactly, as before), one small safetensors file per GPT-2 parameter:

    lf_<native name>.safetensors   {"fp32": master weight, "exp_avg", "exp_avg_sq"}, full
                                   (TP shards joined, ZeRO partitions gathered, the real
                                   vocabulary rows only), fp32

and a ``layout_free`` section in the signed manifest: every name with its shape, the Adam step
count, the learning-rate scheduler's state, DeepSpeed's step counters and the fp16 loss
scaler. Step, consumed samples, skipped steps and fine-tuning's best record are the manifest's
``train_state`` already; the data position is ``consumed_samples`` (``training/data.py``: the
global batch at a position does not depend on the data-parallel size). Export reads its
weights from these files too (``export/reader.py``), whatever layout wrote the checkpoint.

Why not DeepSpeed's universal checkpoint (``ds_to_universal.py``): it converts ZeRO-1/2 and
its pipeline engine's files offline, from each optimizer's flat-partition layout, and does not
cover ZeRO-3 with tensor or pipeline parallelism, which this project trains in. DeepSpeed's
public ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` and their ``safe_set``
counterparts read and write one parameter's full state under every ZeRO stage, offload and
bf16 included, with no knowledge of any file layout, so one implementation covers ZeRO 0-3 ×
TP × PP × sequence parallelism × fine-tuning heads (docs/resharding.md has the comparison).

Memory: saving and loading go one parameter at a time; a rank holds at most one parameter's
three full fp32 tensors (its TP shards gathered onto the one rank that writes it). Writing is
spread over the ranks of the stage that owns a parameter (tp × dp of them, balanced by size).
Loading is local: each rank reads (memory-mapped) the files of its own parameters, one tensor
at a time, and keeps its slice.

The cost: the files take 12 bytes per parameter beside DeepSpeed's own. ``checkpoint.
layout_free: false`` leaves them out (the checkpoint then resumes in its own layout only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gpt_dist import deepspeed_compat
from gpt_dist.checkpoint_format import (
    LAYOUT_FREE_KEYS,
    LAYOUT_FREE_PREFIX,
    CheckpointError,
    Found,
    find_resumable,
    layout_free_file,
)
from gpt_dist.config import Config, arch_diff
from gpt_dist.export.loader import gathered, local_slice
from gpt_dist.export.names import ExportError, canonical_name, tp_dim
from gpt_dist.parallel import ParallelContext, launch_world_size

PREFIX, KEYS = LAYOUT_FREE_PREFIX, LAYOUT_FREE_KEYS
FORMAT = 1

WriteFile = Callable[[Path, Callable[[Path], None], Any], None]
"""``write(path, write_fn, state)``: write one file through the saver's error handling."""


file_name = layout_free_file


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero_stage: int
    precision: str

    def describe(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp} zero={self.zero_stage} {self.precision}"

    def native_resume(self, new: Layout) -> bool:
        """DeepSpeed's own files load in ``new``: the same model split and optimizer wrapper
        (under ZeRO-0 every data-parallel rank holds the whole state, so dp may change)."""
        return ((self.tp, self.pp, self.zero_stage, self.precision) == (new.tp, new.pp, new.zero_stage, new.precision)
                and (self.dp == new.dp or self.zero_stage == 0))


def config_layout(cfg: Config, world_size: int) -> Layout:
    p = cfg.parallel
    return Layout(p.tp, p.pp, world_size // (p.tp * p.pp), cfg.zero_stage, cfg.training.precision)


def manifest_layout(manifest: dict[str, Any], default: Layout) -> Layout:
    """The layout that wrote a checkpoint. ZeRO stage and precision come from the manifest's
    layout (or its config); a manifest with neither (an older writer) is taken to share the
    run's (``default``), as resuming always assumed before they were recorded."""
    lay, config = manifest.get("layout", {}), manifest.get("config", {})
    stage = lay.get("zero_stage", config.get("deepspeed", {}).get("zero_optimization", {}).get("stage"))
    precision = lay.get("precision", config.get("training", {}).get("precision"))
    return Layout(int(lay.get("tp", 1)), int(lay.get("pp", 1)), int(lay.get("dp", 1)),
                  default.zero_stage if stage is None else int(stage),
                  default.precision if precision is None else str(precision))


def unsupported_reason(cfg: Config) -> str | None:
    """Why this run's optimizer state cannot be read per parameter (None: it can)."""
    if cfg.zero_stage == 0 and cfg.training.precision == "fp16":
        return ("ZeRO-0 with fp16 keeps its fp32 masters in DeepSpeed's FP16_Optimizer flat groups, "
                "which have no per-parameter accessor; use ZeRO-1 or higher")
    return None


@dataclass
class ResumePlan:
    """What ``resume`` will load, decided before any process group exists."""

    found: Found
    old: Layout
    new: Layout

    @property
    def reshard(self) -> bool:
        return not self.old.native_resume(self.new)

    def describe(self) -> str:
        st = self.found.manifest.get("train_state", {})
        if not self.reshard:
            return f"resume: {self.found.path} in its own layout ({self.new.describe()})"
        scaler = ", the loss scaler" if "fp16" in (self.old.precision, self.new.precision) else ""
        return (f"resume in a new layout: {self.found.path} written at {self.old.describe()}, "
                f"this run {self.new.describe()}; carrying fp32 master weights, Adam moments and step, "
                f"the LR schedule, step {st.get('step')}, {st.get('consumed_samples')} samples consumed, "
                f"{st.get('skipped_steps', 0)} skipped steps{scaler}; RNG re-derived from (seed, step)")


def plan_resume(cfg: Config, world_size: int | None = None, *, new: Layout | None = None,
                fingerprint: str | None = None, check_hash: bool = True) -> ResumePlan | None:
    """The checkpoint the run will resume from and in which way, or None (a fresh start).

    The run's layout is ``new``, else the config's at ``world_size`` ranks; ``fingerprint``:
    the run's tokenizer's (checked against the checkpoint's when given). Runs before any
    process group work: a checkpoint that fails verification, a different architecture or
    vocabulary, a layout change without layout-free state, a different global batch each
    raise ``CheckpointError`` with one line naming what differs."""
    if cfg.checkpoint.load == "none":
        return None
    found = find_resumable(cfg.run_dir, cfg.checkpoint.on_corrupt, check_hash=check_hash)
    if found is None:
        return None
    mpath = found.path / "manifest.json"
    saved = found.manifest.get("config", {})
    diff = arch_diff(saved.get("model", {}), cfg.model)
    if diff:
        raise CheckpointError(f"{found.path}: incompatible model config: " + "; ".join(diff))
    theirs = found.manifest.get("tokenizer_fingerprint")
    if fingerprint and theirs and theirs != fingerprint:
        raise CheckpointError(f"data.tokenizer: checkpoint {found.path} was trained with tokenizer "
                              f"{theirs[:16]}, this run's is {fingerprint[:16]} (another vocabulary)")
    if new is None:
        new = config_layout(cfg, world_size if world_size is not None else launch_world_size())
    old = manifest_layout(found.manifest, new)
    plan = ResumePlan(found, old, new)
    if not plan.reshard:
        return plan
    section = found.manifest.get("layout_free")
    if not isinstance(section, dict) or "params" not in section:
        why = section.get("unavailable") if isinstance(section, dict) else "checkpoint.layout_free was off"
        raise CheckpointError(
            f"{mpath}: written at {old.describe()} without layout-free state ({why}); this run is "
            f"{new.describe()}: resume it in its own layout, or export it and start with checkpoint.init_from")
    gbs = saved.get("training", {}).get("global_batch_size")
    if gbs != cfg.training.global_batch_size:
        raise CheckpointError(
            f"training.global_batch_size: checkpoint {found.path} was trained with {gbs}, this run has "
            f"{cfg.training.global_batch_size}; a layout change keeps the global batch (it is part of the "
            "training run: the data position and the LR schedule count it)")
    reason = unsupported_reason(cfg)
    if reason:
        raise CheckpointError(f"deepspeed.zero_optimization.stage: cannot resume {found.path} in {new.describe()}: {reason}")
    return plan


# --------------------------------------------------------------------------- save


def _named(module: torch.nn.Module, n_layer: int) -> list[tuple[str, str, torch.nn.Parameter]]:
    """(native name, module name, parameter) of this stage's trainable parameters; a tied copy
    (the token embedding on the last pipeline stage) has the same native name as the original."""
    out = []
    for name, p in module.named_parameters():
        canon = canonical_name(name, n_layer)
        if canon is not None and p.requires_grad:
            out.append((canon, name, p))
    return out


def _has_master(cfg: Config) -> bool:
    """DeepSpeed holds fp32 masters with a per-parameter mapping (ZeRO 1-3, bf16 at ZeRO-0);
    otherwise (ZeRO-0, fp32) the torch optimizer steps the module's weights directly."""
    return cfg.zero_stage > 0 or cfg.training.precision == "bf16"


def ensure_adam_state(eng: Any) -> None:
    """Give every tensor the inner optimizer steps (``deepspeed_compat.optimizer_stepped_tensors``:
    the module's parameters under ZeRO-0, the flat fp32 partitions under ZeRO) its Adam state
    as the first ``step()`` would create it (zero moments, step 0), so that state can be read
    or written before the first step. torch's AdamW and the project's ``FusedAdamW`` keep
    ``step`` as a tensor (on the device for fused/capturable groups), DeepSpeed's CPU Adam as
    an int."""
    optimizer = eng.optimizer
    int_step = "CPUAdam" in type(optimizer).__name__
    on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    for t in deepspeed_compat.optimizer_stepped_tensors(eng.ds, optimizer):
        st = optimizer.state[t]
        if "exp_avg" in st:
            continue
        st["step"] = 0 if int_step else torch.tensor(0.0, device=t.device if on_device else "cpu")
        st["exp_avg"] = torch.zeros_like(t, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(t, memory_format=torch.preserve_format)


def _full_state(cfg: Config, optimizer: torch.optim.Optimizer, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """This TP rank's full fp32 tensors of ``p`` (a collective over its data-parallel group
    under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _has_master(cfg):
        out = {"fp32": safe_get_full_fp32_param(p)}
        for key in KEYS[1:]:
            out[key] = safe_get_full_optimizer_state(p, key)
    else:
        st = optimizer.state[p]
        out = {"fp32": p.detach(), **{key: st[key] for key in KEYS[1:]}}
    shape = tuple(getattr(p, "ds_shape", p.shape))
    return {k: v.detach().float().reshape(shape).cpu() for k, v in out.items()}


def _gather_tp(t: torch.Tensor, dim: int, ctx: ParallelContext, dst_tp: int) -> torch.Tensor | None:
    """The TP shards of ``t`` joined along ``dim`` on TP rank ``dst_tp`` (None elsewhere)."""
    group = ctx.tp_group
    dst = dist.get_global_rank(group, dst_tp)
    parts = [torch.empty_like(t) for _ in range(ctx.tp)] if ctx.tp_rank == dst_tp else None
    dist.gather(t.contiguous(), parts, dst=dst, group=group)
    return torch.cat(parts, dim=dim) if parts is not None else None


def _optimizer_step(optimizer: torch.optim.Optimizer) -> int:
    steps = [int(s["step"]) for s in optimizer.state.values() if isinstance(s, dict) and "step" in s]
    return max(steps, default=0)


def write_state(eng: Any, ctx: ParallelContext, cfg: Config, tag_dir: Path, write: WriteFile) -> dict[str, Any]:
    """Write this checkpoint's layout-free files (every rank; collective) and return the
    manifest's ``layout_free`` section (the same on every rank)."""
    from safetensors.torch import save_file

    reason = unsupported_reason(cfg)
    if reason:
        return {"unavailable": reason}
    named = _named(eng.ds.module, cfg.model.n_layer)
    first_stage: dict[str, int] = {}
    for stage, names in sorted({(s, tuple(n)) for s, n in ctx.all_gather_objects((ctx.pp_rank, [c for c, _, _ in named]))}):
        for n in names:
            first_stage.setdefault(n, stage)
    mine = [(c, p) for c, _, p in named if first_stage[c] == ctx.pp_rank]
    ensure_adam_state(eng)  # a save before the first step
    deepspeed_compat.link_optimizer_state(eng.ds)
    shapes: dict[str, list[int]] = {}
    writers = _writers([p for _, p in mine], ctx.dp * ctx.tp)
    for k, (canon, p) in enumerate(mine):
        writer_dp, writer_tp = divmod(writers[k], ctx.tp)
        tensors: dict[str, torch.Tensor] | None = _full_state(cfg, eng.optimizer, p)
        if ctx.dp_rank != writer_dp:
            continue
        dim = tp_dim(canon)
        if ctx.tp > 1 and dim is not None:
            joined = {key: _gather_tp(t, dim, ctx, writer_tp) for key, t in tensors.items()}
            tensors = None if ctx.tp_rank != writer_tp else joined  # type: ignore[assignment]
        if ctx.tp_rank != writer_tp or tensors is None:
            continue
        if canon == "wte.weight":  # the real vocabulary only: its padding depends on tp
            tensors = {key: t[: cfg.model.vocab_size] for key, t in tensors.items()}
        tensors = {key: t.contiguous() for key, t in tensors.items()}
        write(tag_dir / file_name(canon), lambda path, ts=tensors: save_file(ts, str(path)), tensors)
        shapes[canon] = list(tensors["fp32"].shape)
        del tensors
    all_shapes: dict[str, list[int]] = {}
    for part in ctx.all_gather_objects(shapes):
        all_shapes.update(part)
    step = int(ctx.all_reduce_max(float(_optimizer_step(eng.optimizer))))
    return {"format": FORMAT, "params": dict(sorted(all_shapes.items())), "optimizer_step": step,
            "lr_scheduler": _scheduler_state(eng.scheduler),
            "engine": deepspeed_compat.engine_counters(eng.ds),
            "loss_scaler": deepspeed_compat.loss_scaler_state(eng.ds)}


def _writers(params: list[torch.nn.Parameter], n: int) -> list[int]:
    """Which of a stage's ``n`` (= dp x tp) ranks writes each parameter: the largest first, each
    to the rank with the fewest elements so far (the same on every rank: sizes and order are).
    Round robin by position put every large GPT-2 matrix on one rank: a block has an even
    number of parameters, its weights at even positions."""
    sizes = [torch.Size(getattr(p, "ds_shape", p.shape)).numel() for p in params]
    load, out = [0] * n, [0] * len(params)
    for k in sorted(range(len(params)), key=lambda k: (-sizes[k], k)):
        out[k] = min(range(n), key=lambda i: (load[i], i))
        load[out[k]] += sizes[k]
    return out


def _scheduler_state(scheduler: Any) -> dict[str, Any] | None:
    if scheduler is None:
        return None
    sd = scheduler.state_dict()  # LambdaLR: plain numbers (its lambdas are closures: None)
    sd["lr_lambdas"] = [None] * len(sd.get("lr_lambdas", []))
    return sd


# --------------------------------------------------------------------------- load


def read_state(eng: Any, ctx: ParallelContext, cfg: Config, tag_dir: Path, section: dict[str, Any],
               restore_optim: bool = True) -> None:
    """Load the layout-free state into this run's engine (every rank; collective under
    ZeRO-3, which re-partitions each weight as it is written)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    params, master = section["params"], _has_master(cfg)
    step = int(section.get("optimizer_step", 0))
    tp_group = ctx.tensor_parallel
    if restore_optim:
        ensure_adam_state(eng)
        deepspeed_compat.link_optimizer_state(eng.ds)
    for canon, name, p in _named(eng.ds.module, cfg.model.n_layer):
        path = tag_dir / file_name(canon)
        if canon not in params:
            raise CheckpointError(f"{tag_dir / 'manifest.json'}: no layout-free state for {canon} "
                                  f"(model parameter {name})")
        shape = tuple(getattr(p, "ds_shape", p.shape))
        for key in KEYS if restore_optim else KEYS[:1]:  # one full tensor at a time (memory)
            local = _read_local(path, key, canon, shape, tp_group, cfg, name)
            if key == "fp32":
                with gathered(p), torch.no_grad():
                    p.data.copy_(local.to(p.dtype))
                if master:
                    safe_set_full_fp32_param(p, local)
            elif master:
                safe_set_full_optimizer_state(p, local, key)
            else:  # ZeRO-0 fp32: the torch optimizer steps the module's weights
                eng.optimizer.state[p][key].copy_(local)
            del local
    if restore_optim:
        _set_optimizer_step(eng.optimizer, step)
        sched = section.get("lr_scheduler")
        if sched is not None and eng.scheduler is not None:
            eng.scheduler.load_state_dict(dict(sched))
            for group, lr in zip(eng.optimizer.param_groups, eng.scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
        deepspeed_compat.set_loss_scaler_state(eng.ds, section.get("loss_scaler"))
    deepspeed_compat.set_engine_counters(eng.ds, section.get("engine", {}))


def _read_local(path: Path, key: str, canon: str, shape: tuple[int, ...], tp_group: Any, cfg: Config,
                name: str) -> torch.Tensor:
    """This rank's part of one tensor of a layout-free file. The file is opened (memory-mapped)
    for this one tensor and closed before the next is read, so a rank holds at most one full
    tensor and its mapped pages, not a parameter's three (bench/reshard_bench.py measures it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            missing = [k for k in KEYS if k not in f.keys()]  # noqa: SIM118 - safe_open has no __contains__
            if missing:
                raise CheckpointError(f"{path}: has no tensor(s) {missing}")
            return local_slice(canon, f.get_tensor(key), shape, tp_group, cfg.model, module_name=name)
    except ExportError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _set_optimizer_step(optimizer: torch.optim.Optimizer, step: int) -> None:
    for st in optimizer.state.values():
        if not isinstance(st, dict) or "step" not in st:
            continue
        if torch.is_tensor(st["step"]):
            st["step"] = torch.full_like(st["step"], float(step))
        else:
            st["step"] = step


def derived_seed(seed: int, step: int) -> int:
    """The RNG seed of a run resumed in another layout at ``step`` (dropout masks depend on
    the layout, so the saved generator states do not carry over)."""
    return (seed * 1_000_003 + step * 7_919) % (2**31 - 1)
