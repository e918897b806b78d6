"""Loading exports back (safetensors only) into a model of any layout (the DeepSpeed engine's
side, ``checkpoint.init_from``, is ``gpt_dist.training.init_from``)."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import Any

import torch

from gpt_dist.config import ModelConfig
from gpt_dist.export.hf import from_hf
from gpt_dist.export.names import (
    CONFIG,
    NATIVE_FORMAT,
    TASK_PREFIX,
    WEIGHTS,
    ExportError,
    canonical_name,
    check_state,
    model_config_from_dict,
    task_info,
    tp_dim,
)
from gpt_dist.export.reader import gather_checkpoint, resolve_checkpoint
from gpt_dist.parallel import TPGroup

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
    """(model config, full fp32-or-as-saved native state) of a native or HF GPT-2/GPT-1 export.

    A fine-tuned export's state includes GPT-1's head (``task_head.linear.*``); its task is
    ``export_task(export_dir)``."""
    cfg, state, _ = load_export(export_dir)
    return cfg, state


def load_export(export_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any] | None]:
    """(model config, native state, task head info or None) of a native or HF export."""
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
    task: dict[str, Any] | None
    if conf.get("format") == NATIVE_FORMAT:
        cfg = model_config_from_dict(conf.get("model", {}), str(export_dir / CONFIG))
        task = conf.get("task")
    else:
        cfg = _model_config_from_hf(conf, str(export_dir / CONFIG))
        state = from_hf(state, cfg)
        task = None
        if "task_head.linear.weight" in state:  # a DoubleHeads model: multiple choice
            task = {"task": "multiple_choice", "n_out": 1, "label_names": None, "regression": False,
                    "lm_coef": 0.5, "dropout": float(conf.get("summary_first_dropout", 0.1))}
    check_state(state, cfg, str(weights), task)
    return cfg, state, task


def load_state_into_model(model: torch.nn.Module, full_state: dict[str, torch.Tensor],
                          tp_group: TPGroup | None = None, cfg: ModelConfig | None = None,
                          grow_vocab: bool = False) -> list[str]:
    """Copy a full native state into ``model`` (a ``GPT`` or a pipeline stage) for its TP rank
    (``tp_group``: the model's TP group, ``ParallelContext.tensor_parallel``; None: no TP).

    The vocabulary is re-padded with zero rows to the model's padded size. With
    ``grow_vocab`` (fine-tuning: start/delimiter/extract appended after a pretrained
    vocabulary) an export with fewer rows than ``cfg.vocab_size`` fills the old rows and the
    new ones keep the model's own N(0, init_std) initialisation (seeded by name, so the same
    in every layout). Parameters the state lacks under the ``task_head.`` prefix (a pretrained
    export has no fine-tuning head) keep their initialisation. ZeRO-3 parameters are
    gathered, written and re-partitioned. Returns the native names loaded."""
    tp_group = tp_group or TPGroup()
    n_layer = cfg.n_layer if cfg is not None else getattr(getattr(model, "spec", None), "cfg", ModelConfig()).n_layer
    loaded = []
    for name, param in model.named_parameters():
        canon = canonical_name(name, n_layer)
        if canon is None:
            continue
        if canon not in full_state:
            if canon.startswith(TASK_PREFIX):
                continue
            raise ExportError(f"load: the export has no tensor {canon} (model parameter {name})")
        full = full_state[canon]
        shape = tuple(getattr(param, "ds_shape", param.shape))
        with gathered(param):
            full = local_slice(canon, full, shape, tp_group, cfg, param=param, grow_vocab=grow_vocab,
                               module_name=name)
            with torch.no_grad():
                param.data.copy_(full.to(param.dtype))
        loaded.append(canon)
    return loaded


def local_slice(canon: str, full: torch.Tensor, shape: tuple[int, ...], tp_group: TPGroup,
                cfg: ModelConfig | None, *, param: torch.nn.Parameter | None = None,
                grow_vocab: bool = False, module_name: str | None = None) -> torch.Tensor:
    """This TP rank's part of the full native tensor ``canon``, as a parameter of ``shape``
    holds it: the vocabulary re-padded (zero rows) to the padded size, then split along the
    tensor's TP dimension. Used for weights (``load_state_into_model``) and, by
    ``training/reshard.py``, for the Adam moments of a checkpoint resumed in another layout."""
    tp, tp_rank = tp_group.size, tp_group.rank
    dim = tp_dim(canon)
    if canon == "wte.weight":
        full = _vocab_rows(full, param, shape[0] * tp, tp_group, cfg, grow_vocab)
    if dim is not None and tp > 1:
        if full.dim() <= dim or full.shape[dim] % tp:
            raise ExportError(f"load: tensor {canon} of shape {tuple(full.shape)} cannot be split "
                              f"{tp} ways along dim {dim}")
        per = full.shape[dim] // tp
        full = full.narrow(dim, tp_rank * per, per)
    if tuple(full.shape) != shape:
        raise ExportError(f"load: tensor {canon} has shape {tuple(full.shape)}, model parameter "
                          f"{module_name or canon} expects {shape} (tp rank {tp_rank} of {tp})")
    return full


def gathered(param: torch.nn.Parameter) -> Any:
    """ZeRO-3: the whole parameter on every rank for the block, re-partitioned from rank 0."""
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters(param, modifier_rank=0)

    return contextlib.nullcontext()


def _vocab_rows(full: torch.Tensor, param: torch.nn.Parameter | None, padded: int, tp_group: TPGroup,
                cfg: ModelConfig | None, grow_vocab: bool) -> torch.Tensor:
    """The export's token embedding brought to the model's padded vocabulary (full rows)."""
    if full.shape[0] > padded or full.dim() != 2:
        raise ExportError(f"load: tensor wte.weight has shape {tuple(full.shape)}, model vocabulary "
                          f"is padded to {padded}")
    vocab = cfg.vocab_size if cfg is not None else full.shape[0]
    if full.shape[0] < vocab:
        if not grow_vocab or param is None:
            raise ExportError(f"load: the export has {full.shape[0]} token rows, the model {vocab}; "
                              "only fine-tuning grows the vocabulary")
        # the new real rows: this model's own seeded init (the TP shard's rows, gathered)
        own = _full_rows(param.data, tp_group)
        full = torch.cat([full, own[full.shape[0]:vocab].to(full.dtype)])
    if full.shape[0] < padded:
        full = torch.cat([full, full.new_zeros(padded - full.shape[0], full.shape[1])])
    return full


def _full_rows(shard: torch.Tensor, tp_group: TPGroup) -> torch.Tensor:
    """All TP shards of the vocab-parallel embedding (gathered over the TP group)."""
    if tp_group.size == 1:
        return shard.detach().clone()
    import torch.distributed as dist

    parts = [torch.empty_like(shard) for _ in range(tp_group.size)]
    dist.all_gather(parts, shard.detach().contiguous(), group=tp_group.group)
    return torch.cat(parts)


def load_model_state(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any] | None]:
    """``load_export`` for an export directory; for a run directory (or one of its
    ``global_stepN`` directories) the latest committed checkpoint, verified and read in
    whatever layout wrote it, without writing an export first."""
    path = Path(path)
    if (path / CONFIG).is_file() and not (path / "checkpoints").is_dir():  # a run dir has a config.json too
        return load_export(path)

    tag_dir, manifest = resolve_checkpoint(path)
    config = manifest["config"]
    cfg = model_config_from_dict(config.get("model", {}), str(tag_dir / "manifest.json"))
    state = gather_checkpoint(tag_dir, manifest)
    if "wte.weight" in state:
        state["wte.weight"] = state["wte.weight"][: cfg.vocab_size]
    task = task_info(config)
    check_state(state, cfg, str(tag_dir), task)
    return cfg, state, task

