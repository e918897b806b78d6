"""Model sources: what ``--model PATH`` may name, read into full native tensors, and the
tokenizer that belongs to it.

``PATH`` is one of

* a native export (``launch/export.py``), fine-tuned or not, or a Hugging Face export / a
  user's own local GPT-2 or OpenAI-GPT directory (``config.json`` + ``model.safetensors``;
  a ``GPT2DoubleHeadsModel`` directory carries a multiple-choice head);
* a run directory, or one of its ``checkpoints/global_stepN`` directories: the latest (or
  that) committed checkpoint, verified and read in whatever layout and ZeRO stage wrote it,
  without writing an export first.

``gpt_dist.export.load_model_state`` reads all of them; ``read_source`` adds what the runtime
needs besides the weights: the run's own training config (so prediction builds the model and
reads its input exactly as the run did, not with defaults), the end-of-document id, and a
description for result files. Only model weights are read: no optimizer state.

The tokenizer comes from ``--tokenizer``, else the directory itself (the project's tokenizer
files, copied into every export), else the run's ``data.tokenizer``, else a Hugging Face
tokenizer in the directory (``vocab.json`` + ``merges.txt`` through the project's GPT-2 BPE,
or ``tokenizer.json``). A tokenizer that can produce ids the model has no row for, or whose
fingerprint differs from the one the export or checkpoint recorded, is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt_dist.config import ARCH_KEYS, ModelConfig
from gpt_dist.export import ExportError
from gpt_dist.export.loader import load_model_state
from gpt_dist.export.reader import resolve_checkpoint
from gpt_dist.tokenizer import GPT2BPETokenizer, TokenizerError, load_tokenizer


class InferenceError(ValueError):
    """Bad input to the inference runtime (a model source, a tokenizer, a layout); the
    one-line message names the file (and line) or option."""


@dataclass
class Source:
    """A model source read into memory (full native tensors, every rank the same)."""

    cfg: ModelConfig
    state: dict[str, torch.Tensor]
    task: dict[str, Any] | None
    """The fine-tuning head the weights carry (``export.names.task_info``), or None."""
    training_config: dict[str, Any] | None
    """The run's own config (native exports and run directories; None for Hugging Face)."""
    eod_id: int | None
    info: dict[str, Any] = field(default_factory=dict)
    """path, kind (run / export (native|hf) / hf directory), step, checkpoint, layout."""


def is_run(path: Path) -> bool:
    """A run directory (it has a config.json too: the run's) or one of its checkpoint tags."""
    return (path / "checkpoints").is_dir() or (path / "manifest.json").is_file()


def _json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def read_source(path: str | Path) -> Source:
    """The weights, config and description of ``path`` (module docstring)."""
    p = Path(path)
    if not p.exists():
        raise InferenceError(f"--model: {p}: no such file or directory")
    try:
        cfg, state, task = load_model_state(p)
    except ExportError as exc:
        raise InferenceError(str(exc).splitlines()[0]) from None
    info: dict[str, Any] = {"path": str(p.resolve()), "kind": "run" if is_run(p) else "export"}
    if is_run(p):
        tag_dir, manifest = resolve_checkpoint(p, check_hash=False)
        info.update(step=manifest.get("step"), checkpoint=tag_dir.name, layout=manifest.get("layout"))
        training, eod = manifest.get("config"), None
    else:
        conf = _json(p / "config.json")
        training = conf.get("training_config")
        eod = conf.get("eod_id", conf.get("eos_token_id"))
        if (p / "export.json").is_file():
            e = _json(p / "export.json")
            info.update(kind=f"export ({e.get('format', '?')})", step=e.get("step"))
        else:
            info["kind"] = "hf directory"
    return Source(cfg, state, task, training if isinstance(training, dict) else None,
                  eod if isinstance(eod, int) else None, info)


# --------------------------------------------------------------------------- tokenizers
class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` behind the project's Tokenizer interface (a user's own
    GPT-2 directory without the project's files). Encodes without special tokens, as lm-eval
    does for GPT-2."""

    kind = "hf"

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer  # optional and slow to import: only here

        try:
            self._hf = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:  # noqa: BLE001 - any transformers failure is one line here
            raise InferenceError(f"{path}: unreadable Hugging Face tokenizer "
                                 f"({str(exc).splitlines()[0][:200]})") from None
        if self._hf.eos_token_id is None:
            raise InferenceError(f"{path}: the Hugging Face tokenizer has no eos token (needed as the prefix token)")
        self.path = Path(path)

    def encode(self, text: str) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return str(self._hf.decode(list(ids), skip_special_tokens=True))

    @property
    def vocab_size(self) -> int:
        return len(self._hf)

    @property
    def eod_id(self) -> int:
        return int(self._hf.eos_token_id)

    @property
    def special_ids(self) -> dict[str, int]:
        return {"eod": self.eod_id}

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(b"hf-tokenizer\n")
        for f in sorted(self.path.glob("*")):
            if f.name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                          "special_tokens_map.json"):
                h.update(f.name.encode() + b":" + hashlib.sha256(f.read_bytes()).digest())
        return h.hexdigest()


def _recorded_tokenizer(path: Path) -> tuple[str | None, str | None]:
    """(tokenizer fingerprint recorded with the weights, run's data.tokenizer path)."""
    info = path / "export.json"
    if info.is_file():
        d = _json(info)
        src = d.get("source") or {}
        return src.get("tokenizer_fingerprint") or (d.get("hf_tokenizer") or {}).get("fingerprint"), None
    if not is_run(path):
        return None, None
    try:
        _, manifest = resolve_checkpoint(path, check_hash=False)
    except Exception:  # noqa: BLE001 - read_source reports an unreadable checkpoint itself
        return None, None
    return manifest.get("tokenizer_fingerprint"), (manifest.get("config", {}).get("data", {}) or {}).get("tokenizer")


def find_tokenizer(path: Path, override: str | None = None) -> tuple[Any, str | None]:
    """(tokenizer, recorded fingerprint or None) for the model at ``path`` (module docstring)."""
    recorded, run_tok = _recorded_tokenizer(path)
    candidates = [Path(override)] if override else [path] + ([Path(run_tok)] if run_tok else [])
    errors = []
    for cand in candidates:
        try:
            return load_tokenizer(cand), recorded
        except TokenizerError as exc:
            errors.append(str(exc))
    if not override and path.is_dir():
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return GPT2BPETokenizer(path / "vocab.json", path / "merges.txt"), recorded
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(path), recorded
    where = override or path
    raise InferenceError(f"{where}: no tokenizer found ({'; '.join(errors) or 'none'}); pass --tokenizer DIR")


def check_tokenizer(tok: Any, cfg: ModelConfig, recorded: str | None, where: str) -> None:
    """Refuse a tokenizer that does not belong to the model (see the module docstring)."""
    specials = getattr(tok, "special_ids", {}) or {}
    # ids plain text never encodes to (GPT-1 fine-tuning tokens appended after GPT-2's vocabulary)
    unused = [i for n, i in specials.items() if n != "eod" and i >= cfg.vocab_size]
    plain = int(tok.vocab_size) - len(unused)
    if plain > cfg.vocab_size or int(tok.eod_id) >= cfg.vocab_size:
        raise InferenceError(f"{where}: tokenizer/model mismatch: the tokenizer has {plain} tokens (end of "
                             f"document {tok.eod_id}), the model's vocabulary {cfg.vocab_size}")
    fp = getattr(tok, "fingerprint", None)
    if recorded and fp and recorded != fp:
        raise InferenceError(f"{where}: tokenizer/model mismatch: the weights were trained with tokenizer "
                             f"{recorded[:12]}, this tokenizer is {str(fp)[:12]}")


def state_fingerprint(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> str:
    """sha256 of the architecture and the weights as fp32 (names, shapes, bytes): an fp32
    export of a bf16 run has the fingerprint of the run's checkpoint."""
    h = hashlib.sha256(json.dumps({k: asdict(cfg)[k] for k in ARCH_KEYS}, sort_keys=True).encode())
    for name in sorted(state):
        t = state[name].detach().cpu()
        t = (t.float() if t.is_floating_point() else t).contiguous()
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
