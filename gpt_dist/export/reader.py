"""Reading DeepSpeed checkpoints of any layout (TP shards, pipeline layer files, ZeRO 0-3
partitions) into full tensors with GPT-2 names, after the manifest is verified."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from gpt_dist import checkpoint_format as ckpt
from gpt_dist import deepspeed_compat
from gpt_dist.export.names import (
    ExportError,
    canonical_name,
    model_config_from_dict,
    tp_dim,
)

# --------------------------------------------------------------------------- reading checkpoints


def _deepspeed_safe_globals() -> list[Any]:
    """Plain-data DeepSpeed classes its ZeRO optimizer files pickle (an int enum, the loss
    scaler's attributes, the bf16 optimizer's fragment addresses): allowed by the weights-only unpickler, which builds them without
    running their code. Anything else in a file is still refused."""
    out: list[Any] = []
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        out.append(ZeroStageEnum)
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        out += [LossScaler, DynamicLossScaler]
        from deepspeed.utils.tensor_fragment import fragment_address  # bf16 optimizer: (numel, start)

        out.append(fragment_address)
    except ImportError:
        pass
    return out


def _torch_load(path: Path) -> Any:
    """One checkpoint file, tensors only (no arbitrary unpickling), memory-mapped if possible."""
    if not path.is_file():
        raise ExportError(f"{path}: missing checkpoint file")
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt/truncated zip, an unpickling refusal, ...  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path}: cannot load checkpoint file ({type(exc).__name__}: {first[:200]})") from None


def resolve_checkpoint(run_dir: Path, step: int | None = None, check_hash: bool = True) -> tuple[Path, dict[str, Any]]:
    """(tag directory, verified manifest) of ``run_dir``'s latest or given-step checkpoint.

    ``run_dir`` may also be a checkpoint tag directory itself (one holding manifest.json)."""
    run_dir = Path(run_dir)
    try:
        if (run_dir / ckpt.MANIFEST).is_file() and ckpt.TAG_RE.match(run_dir.name):
            tag_dir = run_dir
        else:
            root = ckpt.ckpt_root(run_dir)
            if not root.is_dir():
                raise ExportError(f"{root}: no checkpoint directory (is {run_dir} a run directory?)")
            if step is not None:
                tag_dir = ckpt.safe_tag_dir(root, ckpt.tag_for(step))
                if not tag_dir.is_dir():
                    have = [ckpt.step_of(t) for t in ckpt.committed_tags(root)]
                    raise ExportError(f"{tag_dir}: no checkpoint for step {step} (committed steps: {have})")
            else:
                tag = ckpt.read_latest(root)
                if tag is None:
                    tags = ckpt.committed_tags(root)
                    if not tags:
                        raise ExportError(f"{root}: no committed checkpoint")
                    tag = tags[-1]
                tag_dir = ckpt.safe_tag_dir(root, tag)
        manifest = ckpt.verify(tag_dir, check_hash=check_hash)
    except ckpt.CheckpointError as exc:
        raise ExportError(str(exc).splitlines()[0]) from None
    for key in ("config", "layout"):
        if not isinstance(manifest.get(key), dict):
            raise ExportError(f"{tag_dir / ckpt.MANIFEST}: has no {key!r} section")
    return tag_dir, manifest


class _Merger:
    """Assembles full tensors from TP shards, one rank file at a time (preallocated)."""

    def __init__(self, tp: int) -> None:
        self.tp = tp
        self.full: dict[str, torch.Tensor] = {}

    def add(self, name: str, shard: torch.Tensor, tp_rank: int, where: Path) -> None:
        dim = tp_dim(name) if self.tp > 1 else None
        if dim is None:
            if name not in self.full:
                self.full[name] = shard.detach().clone()
            return
        shape = list(shard.shape)
        if dim >= len(shape):
            raise ExportError(f"{where}: tensor {name} has shape {tuple(shape)}, cannot split along dim {dim}")
        per = shape[dim]
        shape[dim] = per * self.tp
        full = self.full.get(name)
        if full is None:
            full = self.full[name] = torch.empty(shape, dtype=shard.dtype)
        elif list(full.shape) != shape:
            raise ExportError(f"{where}: TP shard of {name} has shape {tuple(shard.shape)}, "
                              f"inconsistent with the other ranks' {tuple(full.shape)}")
        full.narrow(dim, tp_rank * per, per).copy_(shard)


def _module_states(tag_dir: Path, layout: dict[str, Any], zero_stage: int, n_layer: int,
                   prefer_master: bool) -> Iterable[tuple[int, Path, dict[str, torch.Tensor]]]:
    """(tp_rank, file, {module_name: tensor}) for every file holding weights, one at a time."""
    tp, pp = int(layout.get("tp", 1)), int(layout.get("pp", 1))
    if pp > 1 and not any(tag_dir.glob("layer_*-model_*-model_states.pt")):
        # one DeepSpeed engine per stage (pp > 1 under ZeRO-2/3, training/stages.py): plain
        # engine files, model-parallel rank = pp_rank * tp + tp_rank (parallel.StageMPU)
        yield from _stage_engine_states(tag_dir, tp, pp, zero_stage, prefer_master)
        return
    if pp > 1:
        files = sorted(tag_dir.glob("layer_*-model_*-model_states.pt"))
        for path in files:
            m = re.match(r"layer_(\d+)-model_(\d+)-model_states\.pt$", path.name)
            if not m:
                continue
            layer, tp_rank = int(m.group(1)), int(m.group(2))
            sd = _torch_load(path)
            if not isinstance(sd, dict):
                raise ExportError(f"{path}: not a layer state dict")
            yield tp_rank, path, {f"{layer}.{k}": v for k, v in sd.items()}
            del sd
        return
    for tp_rank in range(tp):
        yield tp_rank, tag_dir, _engine_state(tag_dir, tp_rank, zero_stage, prefer_master)


def _engine_state(tag_dir: Path, mp_rank: int, zero_stage: int, prefer_master: bool) -> dict[str, torch.Tensor]:
    """{module_name: tensor} of one model-parallel rank's plain (non-pipeline) engine files."""
    if zero_stage == 3:
        return _zero3_state(tag_dir, mp_rank)
    path = tag_dir / f"mp_rank_{mp_rank:02d}_model_states.pt"
    sd = _torch_load(path)
    if not isinstance(sd, dict) or not isinstance(sd.get("module"), dict):
        raise ExportError(f"{path}: has no 'module' state dict")
    module = sd["module"]
    floats = [v for v in module.values() if torch.is_tensor(v) and v.is_floating_point()]
    if prefer_master and zero_stage in (1, 2) and floats and floats[0].dtype != torch.float32:
        module = _zero12_master(tag_dir, mp_rank, sd) or module
    return module


def _stage_engine_states(tag_dir: Path, tp: int, pp: int, zero_stage: int,
                         prefer_master: bool) -> Iterable[tuple[int, Path, dict[str, torch.Tensor]]]:
    """Each stage's weights; the last stage's copy of the tied embedding module is left out
    (its ``wte`` equals the first stage's; its ``wpe`` is never used)."""
    for mp_rank in range(tp * pp):
        module = _engine_state(tag_dir, mp_rank, zero_stage, prefer_master)
        if mp_rank >= tp:
            module = {k: v for k, v in module.items() if not k.startswith("tied_modules.")}
        yield mp_rank % tp, tag_dir, module


def _zero_model_state(path: Path, sd: dict[str, Any]) -> Any:
    from deepspeed.utils.zero_to_fp32 import zero_model_state

    if "param_shapes" not in sd or "buffer_names" not in sd:
        raise ExportError(f"{path}: not a DeepSpeed model state file")
    buffers = {k: v.float() if v.is_floating_point() else v
               for k, v in sd.get("module", {}).items() if k in sd["buffer_names"]}
    return zero_model_state(buffers=buffers, param_shapes=sd["param_shapes"],
                            shared_params=[[k, v] for k, v in sd.get("shared_params", {}).items()],
                            ds_version=sd.get("ds_version"), frozen_param_shapes=sd.get("frozen_param_shapes"),
                            frozen_param_fragments=sd.get("frozen_param_fragments"))


def _optim_flat_groups(paths: list[Path], key: str) -> tuple[list[Any], int, Any]:
    groups, world, paddings = [], None, None
    for path in paths:
        sd = _torch_load(path)
        osd = sd.get("optimizer_state_dict") if isinstance(sd, dict) else None
        if not isinstance(osd, dict) or key not in osd:
            raise ExportError(f"{path}: not a DeepSpeed ZeRO optimizer state file (no {key})")
        world = osd.get("partition_count")
        paddings = osd.get("param_alignment_paddings", paddings)
        groups.append([t.clone() for t in osd[key]])  # the fp32 masters; Adam moments dropped
        del sd, osd
    if isinstance(world, list):
        world = max(world)
    if world != len(paths):
        raise ExportError(f"{paths[0].parent}: {len(paths)} optimizer partition files for "
                          f"data-parallel size {world} (a rank's file is missing)")
    return groups, int(world), paddings


def _zero3_state(tag_dir: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    """Full (this TP rank's) fp32 parameters of a ZeRO-3 checkpoint, via DeepSpeed's helpers."""
    model_files = sorted(tag_dir.glob(f"zero_pp_rank_*_mp_rank_{tp_rank:02d}_model_states.pt"),
                         key=lambda p: int(re.search(r"zero_pp_rank_(\d+)_", p.name).group(1)))  # type: ignore[union-attr]
    optim_files = sorted(tag_dir.glob(f"*zero_pp_rank_*_mp_rank_{tp_rank:02d}_optim_states.pt"),
                         key=lambda p: int(re.search(r"zero_pp_rank_(\d+)_", p.name).group(1)))  # type: ignore[union-attr]
    if not model_files or not optim_files:
        raise ExportError(f"{tag_dir}: ZeRO-3 checkpoint without zero_pp_rank_*_mp_rank_{tp_rank:02d} "
                          "model/optim state files")
    states = []
    for path in model_files:
        sd = _torch_load(path)
        states.append(_zero_model_state(path, sd))
        del sd
    groups, world, _ = _optim_flat_groups(optim_files, "fp32_flat_groups")
    if len(states) != world:
        raise ExportError(f"{tag_dir}: {len(states)} model state files for data-parallel size {world}")
    return deepspeed_compat.zero3_merge_params(world, groups, states)


def _zero12_master(tag_dir: Path, tp_rank: int, sd: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """fp32 master weights of a ZeRO-1/2 bf16/fp16 run (None if the optimizer files are absent)."""
    files = sorted(tag_dir.glob(f"*zero_pp_rank_*_mp_rank_{tp_rank:02d}_optim_states.pt"),
                   key=lambda p: int(re.search(r"zero_pp_rank_(\d+)_", p.name).group(1)))  # type: ignore[union-attr]
    if not files:
        return None
    state = _zero_model_state(tag_dir / f"mp_rank_{tp_rank:02d}_model_states.pt", sd)
    groups, world, paddings = _optim_flat_groups(files, "single_partition_of_fp32_groups")
    return deepspeed_compat.zero2_merge_params(world, groups, [state] * world, paddings)


def gather_checkpoint(tag_dir: Path, manifest: dict[str, Any], prefer_master: bool = True,
                      source: str = "auto") -> dict[str, torch.Tensor]:
    """The whole model of a verified checkpoint with native names.

    ``source``: ``layout_free`` reads the checkpoint's layout-free files (the fp32 masters,
    one small file per parameter, whatever layout wrote it; the real vocabulary rows);
    ``deepspeed`` merges DeepSpeed's per-layout files (TP shards, pipeline layer files, ZeRO
    partitions; the vocabulary padding kept); ``auto`` (default) the first where the
    checkpoint has it and masters are wanted, else the second."""
    section = manifest.get("layout_free")
    has_free = isinstance(section, dict) and bool(section.get("params"))
    if source == "layout_free" or (source == "auto" and prefer_master and has_free):
        if not has_free:
            raise ExportError(f"{tag_dir / ckpt.MANIFEST}: the checkpoint has no layout-free state")
        return _layout_free_weights(tag_dir, section)  # type: ignore[arg-type]
    if source not in ("auto", "deepspeed"):
        raise ValueError(f"gather_checkpoint: source {source!r} is not auto, layout_free or deepspeed")
    config, layout = manifest["config"], manifest["layout"]
    cfg = model_config_from_dict(config.get("model", {}), str(tag_dir / "manifest.json"))
    stage = int(config.get("deepspeed", {}).get("zero_optimization", {}).get("stage", 0))
    merger = _Merger(int(layout.get("tp", 1)))
    for tp_rank, path, module in _module_states(tag_dir, layout, stage, cfg.n_layer, prefer_master):
        for name, tensor in module.items():
            if not torch.is_tensor(tensor):
                continue
            canon = canonical_name(name, cfg.n_layer)
            if canon is None:
                continue
            merger.add(canon, tensor, tp_rank, path)
    return merger.full



def _layout_free_weights(tag_dir: Path, section: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The fp32 master weights of every parameter the manifest lists, from its layout-free
    file (safetensors: no unpickling; one file open at a time)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for name, shape in section["params"].items():
        path = tag_dir / ckpt.layout_free_file(name)
        if not path.is_file():
            raise ExportError(f"{path}: missing layout-free file")
        try:
            with safe_open(str(path), framework="pt") as fh:
                t = fh.get_tensor("fp32")
        except Exception as exc:  # noqa: BLE001 - a corrupt file, whatever safetensors raises
            raise ExportError(f"{path}: cannot read layout-free file ({type(exc).__name__}: {exc})") from None
        if list(t.shape) != list(shape):
            raise ExportError(f"{path}: tensor fp32 has shape {list(t.shape)}, the manifest says {shape}")
        out[name] = t
    return out
