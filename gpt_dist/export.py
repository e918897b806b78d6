"""Export a training checkpoint to one safetensors file, and load exports back, in any layout.

A checkpoint is DeepSpeed's files for one parallel layout (TP shards, pipeline layer files,
ZeRO partitions). An *export* is the model alone, whole, with GPT-2 names::

    EXPORT_DIR/model.safetensors   full tensors (TP shards merged, vocabulary padding stripped)
    EXPORT_DIR/config.json         native: {"format": "gpt_dist-native", "model": {...},
                                   "training_config": {...}, "eod_id": N};  hf: the
                                   transformers config (GPT2LMHeadModel / OpenAIGPTLMHeadModel)
    EXPORT_DIR/export.json         step, tokens seen, validation loss, source checkpoint/layout
    EXPORT_DIR/<tokenizer files>   copied from the run's data.tokenizer directory, if any

Native tensor names and layout are those of a TP=1 ``GPT`` with the module prefixes
(``embed.``, ``head.``) dropped: ``wte.weight`` [vocab, h], ``wpe.weight``,
``h.N.ln_1.weight``, ``h.N.attn.c_attn.weight`` [3h, h] (torch Linear [out, in], rows ordered
(head, {q,k,v}, head_dim) as in the model), ..., ``ln_f.weight`` (GPT-2 only).

TP merge rules (megatron-core layers): column-parallel weights/biases (c_attn, c_fc) and the
vocab-parallel ``wte`` are concatenated along dim 0; row-parallel weights (attn/mlp c_proj)
along dim 1; everything else (wpe, LayerNorms, row-parallel biases) is replicated.

Hugging Face: ``--format hf`` writes GPT2LMHeadModel (gpt2) or OpenAIGPTLMHeadModel (gpt1)
weights: Conv1D weights are [in, out] (transposed) and c_attn's output is reordered to q|k|v.
``load_native`` reads either kind of directory back to native names.

Every file is opened safely: checkpoint files with ``torch.load(weights_only=True)`` after
``checkpoint.verify`` accepted the manifest, exports through safetensors only. Problems are
``ExportError`` with one line that names the file (and the tensor).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gpt_dist.config import ModelConfig
from gpt_dist.export_hf import from_hf, hf_config, to_hf  # re-exported

NATIVE_FORMAT = "gpt_dist-native"
WEIGHTS = "model.safetensors"
EXPORT_INFO = "export.json"
CONFIG = "config.json"
_OWN_FILES = {WEIGHTS, EXPORT_INFO, CONFIG}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(RuntimeError):
    """An export or import problem; the message is one line naming the file / tensor."""


# --------------------------------------------------------------------------- names & shapes


def canonical_name(module_name: str, n_layer: int) -> str | None:
    """GPT / PipelineModule parameter name -> native export name (None: not a weight)."""
    if module_name.endswith("_extra_state"):
        return None
    name = module_name
    name = name.removeprefix("module.")
    name = name.removeprefix("tied_modules.embed.")
    m = re.match(r"^(\d+)\.(.*)$", name)              # pipeline: global layer index
    if m:
        from gpt_dist.pipeline import pipe_name_to_gpt

        mapped = pipe_name_to_gpt(int(m.group(1)), m.group(2), n_layer)
        if mapped is None:
            return None
        name = mapped
    for prefix in ("embed.", "head."):
        name = name.removeprefix(prefix)
    return name


def module_name(canonical: str, pipeline_layer: int | None = None) -> str:
    """Native name -> the name in a pp=1 ``GPT``."""
    if canonical.startswith(("wte.", "wpe.")):
        return "embed." + canonical
    if canonical.startswith("ln_f."):
        return "head." + canonical
    return canonical


def tp_dim(name: str) -> int | None:
    """The dimension a native tensor is split along under TP (None: replicated)."""
    if name == "wte.weight":
        return 0
    if re.search(r"\.(attn\.c_attn|mlp\.c_fc)\.(weight|bias)$", name):
        return 0
    if re.search(r"\.(attn|mlp)\.c_proj\.weight$", name):
        return 1
    return None


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every native tensor of a model with this config and its full shape (real vocabulary)."""
    h = cfg.n_embd
    out: dict[str, tuple[int, ...]] = {"wte.weight": (cfg.vocab_size, h), "wpe.weight": (cfg.n_ctx, h)}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        shapes = {"ln_1.weight": (h,), "ln_1.bias": (h,), "attn.c_attn.weight": (3 * h, h),
                  "attn.c_attn.bias": (3 * h,), "attn.c_proj.weight": (h, h), "attn.c_proj.bias": (h,),
                  "ln_2.weight": (h,), "ln_2.bias": (h,), "mlp.c_fc.weight": (4 * h, h),
                  "mlp.c_fc.bias": (4 * h,), "mlp.c_proj.weight": (h, 4 * h), "mlp.c_proj.bias": (h,)}
        for k, v in shapes.items():
            if k.endswith(".bias") and "ln_" not in k and not cfg.bias:
                continue
            out[p + k] = v
    if cfg.arch == "gpt2":
        out["ln_f.weight"] = (h,)
        out["ln_f.bias"] = (h,)
    return out


def check_state(state: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> None:
    want = expected_shapes(cfg)
    missing = [k for k in want if k not in state]
    if missing:
        raise ExportError(f"{where}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    extra = [k for k in state if k not in want]
    if extra:
        raise ExportError(f"{where}: unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for k, shape in want.items():
        if tuple(state[k].shape) != shape:
            raise ExportError(f"{where}: tensor {k} has shape {tuple(state[k].shape)}, expected {shape}")


def model_config_from_dict(d: dict[str, Any], where: str) -> ModelConfig:
    try:
        return ModelConfig(**d)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{where}: bad model config ({exc})") from None


# --------------------------------------------------------------------------- reading checkpoints


def _deepspeed_safe_globals() -> list[Any]:
    """Plain-data DeepSpeed classes its ZeRO optimizer files pickle (an int enum, the loss
    scaler's attributes): allowed by the weights-only unpickler, which builds them without
    running their code. Anything else in a file is still refused."""
    out: list[Any] = []
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        out.append(ZeroStageEnum)
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        out += [LossScaler, DynamicLossScaler]
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
    from gpt_dist.training import checkpoint as ckpt

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
    if pp > 1:
        files = sorted(tag_dir.glob("layer_*-model_*-model_states.pt"))
        if not files:
            raise ExportError(f"{tag_dir}: pipeline checkpoint (pp={pp}) without layer_*-model_states.pt files")
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
        if zero_stage == 3:
            yield tp_rank, tag_dir, _zero3_state(tag_dir, tp_rank)
            continue
        path = tag_dir / f"mp_rank_{tp_rank:02d}_model_states.pt"
        sd = _torch_load(path)
        if not isinstance(sd, dict) or not isinstance(sd.get("module"), dict):
            raise ExportError(f"{path}: has no 'module' state dict")
        module = sd["module"]
        floats = [v for v in module.values() if torch.is_tensor(v) and v.is_floating_point()]
        if prefer_master and zero_stage in (1, 2) and floats and floats[0].dtype != torch.float32:
            module = _zero12_master(tag_dir, tp_rank, sd) or module
        yield tp_rank, path, module
        del sd, module


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
    from deepspeed.utils import zero_to_fp32 as z

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
    out: dict[str, Any] = {}
    z._zero3_merge_trainable_params(out, world, groups, states)
    return {k: (v.contiguous() if not torch.is_tensor(v) else v) for k, v in out.items()}


def _zero12_master(tag_dir: Path, tp_rank: int, sd: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """fp32 master weights of a ZeRO-1/2 bf16/fp16 run (None if the optimizer files are absent)."""
    from deepspeed.utils import zero_to_fp32 as z

    files = sorted(tag_dir.glob(f"*zero_pp_rank_*_mp_rank_{tp_rank:02d}_optim_states.pt"),
                   key=lambda p: int(re.search(r"zero_pp_rank_(\d+)_", p.name).group(1)))  # type: ignore[union-attr]
    if not files:
        return None
    state = _zero_model_state(tag_dir / f"mp_rank_{tp_rank:02d}_model_states.pt", sd)
    groups, world, paddings = _optim_flat_groups(files, "single_partition_of_fp32_groups")
    out: dict[str, Any] = {}
    z._zero2_merge_trainable_params(out, world, groups, [state] * world, paddings)
    return out


def gather_checkpoint(tag_dir: Path, manifest: dict[str, Any], prefer_master: bool = True) -> dict[str, torch.Tensor]:
    """The whole model of a verified checkpoint with native names (vocabulary padding kept)."""
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


# --------------------------------------------------------------------------- export


def _tokenizer_eod(tok_dir: Path | None) -> int | None:
    if tok_dir is None:
        return None
    try:
        from gpt_dist.tokenizer import load_tokenizer
    except ImportError:
        return None
    try:
        return int(load_tokenizer(str(tok_dir)).eod_id)
    except Exception:  # a tokenizer we cannot read: the caller can pass --eod-id  # noqa: BLE001
        return None


def _copy_tokenizer(src: Path, out: Path) -> list[str]:
    copied = []
    for p in sorted(src.iterdir()):
        if p.name in _OWN_FILES or p.name.startswith("."):
            continue
        if p.is_file() and not p.is_symlink():
            shutil.copy2(p, out / p.name)
            copied.append(p.name)
        elif p.is_dir() and not p.is_symlink():
            shutil.copytree(p, out / p.name, dirs_exist_ok=True, symlinks=False)
            copied.append(p.name + "/")
    return copied


def _hf_tokenizer(out: Path, cfg: ModelConfig) -> dict[str, Any]:
    """Hugging Face tokenizer files for the tokenizer copied into ``out`` (hf exports)."""
    import sys

    from gpt_dist.export_hf import write_hf_tokenizer

    try:
        from gpt_dist.tokenizer import load_tokenizer

        tok = load_tokenizer(out)
    except Exception as exc:  # not one of our tokenizers: the weights are still exported  # noqa: BLE001
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        print(f"export: warning: no Hugging Face tokenizer written ({reason})", file=sys.stderr)
        return {"files": [], "skipped": reason}
    if tok.vocab_size > cfg.vocab_size:
        raise ExportError(f"{out}: tokenizer has {tok.vocab_size} tokens, the model's vocabulary {cfg.vocab_size}")
    files = write_hf_tokenizer(tok, out, cfg.n_ctx)
    return {"files": files, "kind": tok.kind, "fingerprint": tok.fingerprint}


def _write_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o644 & ~umask)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    from gpt_dist.utils import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def export_state(state: dict[str, torch.Tensor], cfg: ModelConfig, out: Path, fmt: str = "native",
                 dtype: str = "fp32", info: dict[str, Any] | None = None,
                 training_config: dict[str, Any] | None = None, eod_id: int | None = None,
                 tokenizer_dir: Path | None = None) -> Path:
    """Write a full native state (real vocabulary) as an export directory."""
    if fmt not in ("native", "hf"):
        raise ExportError(f"--format: must be native or hf, got {fmt!r}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype: must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_state(state, cfg, "export")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    copied = _copy_tokenizer(Path(tokenizer_dir), out) if tokenizer_dir is not None else []
    if eod_id is None:
        eod_id = _tokenizer_eod(out) if copied else None
    cast = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    if fmt == "native":
        _write_safetensors(cast, out / WEIGHTS, {"format": "pt", "gpt_dist": NATIVE_FORMAT})
        _write_json(out / CONFIG, {"format": NATIVE_FORMAT, "model": asdict(cfg), "eod_id": eod_id,
                                   "dtype": dtype, "training_config": training_config})
    else:
        _write_safetensors(to_hf(cast, cfg), out / WEIGHTS, {"format": "pt"})
        if copied:
            hf_tok = _hf_tokenizer(out, cfg)
            info = {**(info or {}), "hf_tokenizer": hf_tok}
            copied = sorted(set(copied) | set(hf_tok.get("files", [])))
        conf = hf_config(cfg, eod_id)
        conf["torch_dtype"] = conf["dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
        _write_json(out / CONFIG, conf)
    _write_json(out / EXPORT_INFO, {"format": fmt if fmt == "hf" else NATIVE_FORMAT, "dtype": dtype,
                                    "eod_id": eod_id, "model": asdict(cfg), "tokenizer_files": copied,
                                    **(info or {})})
    return out


def export_checkpoint(run_dir: Path, out: Path, step: int | None = None, fmt: str = "native",
                      dtype: str = "fp32", eod_id: int | None = None, check_hash: bool = True) -> Path:
    """``launch/export.py``: verify, gather, merge, strip padding, write."""
    tag_dir, manifest = resolve_checkpoint(Path(run_dir), step, check_hash)
    config = manifest["config"]
    cfg = model_config_from_dict(config.get("model", {}), str(tag_dir / "manifest.json"))
    state = gather_checkpoint(tag_dir, manifest)
    wte = state.get("wte.weight")
    if wte is not None and wte.shape[0] >= cfg.vocab_size:
        state["wte.weight"] = wte[: cfg.vocab_size].clone()
    check_state(state, cfg, str(tag_dir))
    ts = manifest.get("train_state", {}) or {}
    tok = config.get("data", {}).get("tokenizer") or ""
    tok_dir = Path(tok) if tok and Path(tok).is_dir() and any(Path(tok).iterdir()) else None
    zero = int(config.get("deepspeed", {}).get("zero_optimization", {}).get("stage", 0))
    info = {"step": manifest.get("step", ts.get("step")), "tokens_seen": ts.get("tokens_seen"),
            "consumed_samples": ts.get("consumed_samples"), "validation_loss": ts.get("last_val_loss"),
            "source": {"checkpoint": str(tag_dir.resolve()), "tag": tag_dir.name,
                       "layout": manifest.get("layout"), "zero_stage": zero,
                       "precision": config.get("training", {}).get("precision"),
                       "tokenizer_fingerprint": manifest.get("tokenizer_fingerprint")}}
    if eod_id is None and tok_dir is not None:
        eod_id = _tokenizer_eod(tok_dir)
    return export_state(state, cfg, Path(out), fmt, dtype, info, config, eod_id, tok_dir)


# --------------------------------------------------------------------------- loading exports


def _safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and bounds-check the header so a truncated file names the first missing tensor."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ExportError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 * 2**20):
                raise ExportError(f"{path}: truncated or corrupt safetensors header (length {n}, file {size} bytes)")
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        raise ExportError(f"{path}: missing") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, ExportError):
            raise
        raise ExportError(f"{path}: corrupt safetensors header ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ExportError(f"{path}: corrupt safetensors header")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise ExportError(f"{path}: tensor {name}: corrupt header entry")
        if offsets[1] > data:
            raise ExportError(f"{path}: truncated: tensor {name} needs bytes {offsets[0]}..{offsets[1]} "
                              f"of the data section, the file has {data}")
    return header


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    header = _safetensors_header(path)
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            for name in fh.keys():  # noqa: SIM118  (safe_open is not iterable)
                out[name] = fh.get_tensor(name)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"{path}: unreadable safetensors file ({str(exc).splitlines()[0][:200]})") from None
    del header
    return out, meta


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ExportError(f"{path}: not a JSON object")
    return obj


def _model_config_from_hf(conf: dict[str, Any], where: str) -> ModelConfig:
    mt = conf.get("model_type")
    if mt not in ("gpt2", "openai-gpt"):
        raise ExportError(f"{where}: model_type {mt!r} is neither gpt2 nor openai-gpt")
    act = conf.get("activation_function" if mt == "gpt2" else "afn", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu" if mt == "openai-gpt" else "gelu_new"):
        raise ExportError(f"{where}: activation {act!r} is not the tanh GELU gpt_dist uses")
    if mt == "gpt2" and conf.get("n_inner") not in (None, 4 * conf["n_embd"]):
        raise ExportError(f"{where}: n_inner {conf.get('n_inner')} != 4 * n_embd")
    return model_config_from_dict({
        "arch": "gpt2" if mt == "gpt2" else "gpt1", "n_layer": conf["n_layer"], "n_head": conf["n_head"],
        "n_embd": conf["n_embd"], "n_ctx": conf["n_positions"], "vocab_size": conf["vocab_size"],
        "ln_eps": conf.get("layer_norm_epsilon", 1e-5), "dropout": conf.get("resid_pdrop", 0.1),
        "attn_dropout": conf.get("attn_pdrop", 0.1), "init_std": conf.get("initializer_range", 0.02)}, where)


def load_native(export_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(model config, full fp32-or-as-saved native state) of a native or HF GPT-2/GPT-1 export."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise ExportError(f"{export_dir}: not a directory")
    conf = _read_json(export_dir / CONFIG)
    weights = export_dir / WEIGHTS
    if not weights.exists():
        pickles = [p.name for p in export_dir.glob("*.bin")] + [p.name for p in export_dir.glob("*.pt")]
        hint = f" (found {pickles}: pickle files are not loaded; convert to safetensors)" if pickles else ""
        raise ExportError(f"{weights}: missing{hint}")
    state, _ = read_safetensors(weights)
    if conf.get("format") == NATIVE_FORMAT:
        cfg = model_config_from_dict(conf.get("model", {}), str(export_dir / CONFIG))
    else:
        cfg = _model_config_from_hf(conf, str(export_dir / CONFIG))
        state = from_hf(state, cfg)
    check_state(state, cfg, str(weights))
    return cfg, state


def load_state_into_model(model: torch.nn.Module, full_state: dict[str, torch.Tensor],
                          tp_rank: int, tp: int, cfg: ModelConfig | None = None) -> list[str]:
    """Copy a full native state into ``model`` (a ``GPT`` or a pipeline stage) for its TP rank.

    The vocabulary is re-padded with zero rows to the model's padded size. ZeRO-3 parameters
    are gathered, written and re-partitioned. Returns the native names loaded."""
    n_layer = cfg.n_layer if cfg is not None else getattr(getattr(model, "spec", None), "cfg", ModelConfig()).n_layer
    loaded = []
    for name, param in model.named_parameters():
        canon = canonical_name(name, n_layer)
        if canon is None:
            continue
        if canon not in full_state:
            raise ExportError(f"load: the export has no tensor {canon} (model parameter {name})")
        full = full_state[canon]
        shape = tuple(getattr(param, "ds_shape", param.shape))
        dim = tp_dim(canon)
        if canon == "wte.weight":
            padded = shape[0] * tp
            if full.shape[0] > padded or full.dim() != 2:
                raise ExportError(f"load: tensor {canon} has shape {tuple(full.shape)}, model vocabulary "
                                  f"is padded to {padded}")
            if full.shape[0] < padded:
                full = torch.cat([full, full.new_zeros(padded - full.shape[0], full.shape[1])])
        if dim is not None and tp > 1:
            if full.dim() <= dim or full.shape[dim] % tp:
                raise ExportError(f"load: tensor {canon} of shape {tuple(full.shape)} cannot be split "
                                  f"{tp} ways along dim {dim}")
            per = full.shape[dim] // tp
            full = full.narrow(dim, tp_rank * per, per)
        if tuple(full.shape) != shape:
            raise ExportError(f"load: tensor {canon} has shape {tuple(full.shape)}, model parameter "
                              f"{name} expects {shape} (tp rank {tp_rank} of {tp})")
        if hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters(param, modifier_rank=0), torch.no_grad():
                param.data.copy_(full.to(param.dtype))
        else:
            with torch.no_grad():
                param.data.copy_(full.to(param.dtype))
        loaded.append(canon)
    return loaded


def load_into_engine(path: Any, eng: Any, cfg: Any, ctx: Any) -> None:
    """``checkpoint.init_from``: load an export into a freshly built engine of any layout.

    Every rank reads the export (safetensors, memory-mapped) and keeps its TP slice. Under
    bf16/fp16 with ZeRO 1-2 the optimizer's fp32 master partitions are refreshed from the
    module weights so the first step starts from the loaded values."""
    mcfg, state = load_native(Path(path))
    from gpt_dist.config import ARCH_KEYS

    diff = [f"model.{k}: export {getattr(mcfg, k)!r} != config {getattr(cfg.model, k)!r}"
            for k in ARCH_KEYS if getattr(mcfg, k) != getattr(cfg.model, k)]
    if diff:
        raise ExportError(f"{path}: incompatible with this run's model: " + "; ".join(diff))
    module = eng.ds.module
    loaded = set(load_state_into_model(module, state, ctx.tp_rank, ctx.tp, cfg.model))
    if not eng.is_pipeline or ctx.pp == 1:
        missing = set(expected_shapes(mcfg)) - loaded
        if missing:
            raise ExportError(f"{path}: model parameters not loaded: {sorted(missing)[:5]}")
    _refresh_master_weights(eng)


def _refresh_master_weights(eng: Any) -> None:
    """Copy module weights into ZeRO-1/2's fp32 master partitions (bf16/fp16 runs)."""
    opt = getattr(eng.ds, "optimizer", None)
    if opt is None:
        return
    if hasattr(opt, "refresh_fp32_params"):
        opt.refresh_fp32_params()
