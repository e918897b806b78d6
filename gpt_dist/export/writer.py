"""Writing an export directory (native or Hugging Face) from full tensors or a checkpoint."""

from __future__ import annotations

import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gpt_dist.config import ModelConfig
from gpt_dist.export.hf import hf_config, to_hf, write_hf_tokenizer
from gpt_dist.export.names import (
    _OWN_FILES,
    CONFIG,
    DTYPES,
    EXPORT_INFO,
    NATIVE_FORMAT,
    WEIGHTS,
    ExportError,
    check_state,
    model_config_from_dict,
    task_info,
)
from gpt_dist.export.reader import gather_checkpoint, resolve_checkpoint
from gpt_dist.tokenizer import load_tokenizer
from gpt_dist.utils import atomic_path, atomic_write_json

# --------------------------------------------------------------------------- export


def _tokenizer_eod(tok_dir: Path | None) -> int | None:
    if tok_dir is None:
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
    try:
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

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, indent=2)


def export_state(state: dict[str, torch.Tensor], cfg: ModelConfig, out: Path, fmt: str = "native",
                 dtype: str = "fp32", info: dict[str, Any] | None = None,
                 training_config: dict[str, Any] | None = None, eod_id: int | None = None,
                 tokenizer_dir: Path | None = None) -> Path:
    """Write a full native state (real vocabulary) as an export directory.

    A fine-tuned state (``training_config`` has a ``finetune`` section) carries GPT-1's head
    ``task_head.linear.*``; its native config.json records the task under ``"task"``. In
    Hugging Face format only multiple choice has a matching model (``GPT2DoubleHeadsModel`` /
    ``OpenAIGPTDoubleHeadsModel``: one score per choice at the extract token); the other
    task types are native-only and refused with a one-line error."""
    if fmt not in ("native", "hf"):
        raise ExportError(f"--format: must be native or hf, got {fmt!r}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype: must be one of {sorted(DTYPES)}, got {dtype!r}")
    task = task_info(training_config)
    check_state(state, cfg, "export", task)
    if fmt == "hf" and task is not None and task["task"] != "multiple_choice":
        raise ExportError(f"{out}: a fine-tuned {task['task']} model has no Hugging Face class with the same "
                          "head (GPT2DoubleHeadsModel is multiple choice); export it with --format native")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    copied = _copy_tokenizer(Path(tokenizer_dir), out) if tokenizer_dir is not None else []
    if eod_id is None:
        eod_id = _tokenizer_eod(out) if copied else None
    cast = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    if fmt == "native":
        _write_safetensors(cast, out / WEIGHTS, {"format": "pt", "gpt_dist": NATIVE_FORMAT})
        _write_json(out / CONFIG, {"format": NATIVE_FORMAT, "model": asdict(cfg), "eod_id": eod_id,
                                   "dtype": dtype, "training_config": training_config, "task": task})
    else:
        _write_safetensors(to_hf(cast, cfg), out / WEIGHTS, {"format": "pt"})
        if copied:
            hf_tok = _hf_tokenizer(out, cfg)
            info = {**(info or {}), "hf_tokenizer": hf_tok}
            copied = sorted(set(copied) | set(hf_tok.get("files", [])))
        conf = hf_config(cfg, eod_id, task)
        conf["torch_dtype"] = conf["dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
        _write_json(out / CONFIG, conf)
    _write_json(out / EXPORT_INFO, {"format": fmt if fmt == "hf" else NATIVE_FORMAT, "dtype": dtype,
                                    "eod_id": eod_id, "model": asdict(cfg), "tokenizer_files": copied,
                                    "task": task, **(info or {})})
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
    check_state(state, cfg, str(tag_dir), task_info(config))
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

