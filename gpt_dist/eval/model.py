"""The model under evaluation: loaded from an export, a Hugging Face directory or a run
directory, on this rank's part of a TP x PP (x DP) layout, with its tokenizer.

``--model PATH`` is one of

* a native export (``launch/export.py``), or a Hugging Face export / a user's own local
  GPT-2 or OpenAI-GPT directory (``config.json`` + ``model.safetensors``);
* a run directory, or one of its ``checkpoints/global_stepN`` directories: the latest
  (or that) committed checkpoint, verified and read in whatever layout and ZeRO stage wrote
  it, without writing an export first.

``gpt_dist.export.load_model_state`` reads all three into full native tensors; every rank
keeps its TP slice (``load_state_into_model``) of the model that ``build_inference_model``
builds for its pipeline stage. Only model weights are read: no optimizer state.

The tokenizer comes from ``--tokenizer``, else the directory itself (the project's tokenizer
files, copied into every export), else the run's ``data.tokenizer``, else a Hugging Face
tokenizer in the directory (``vocab.json`` + ``merges.txt`` through the project's GPT-2 BPE,
or ``tokenizer.json``). A tokenizer that can produce ids the model has no row for, or whose
fingerprint differs from the one the export or checkpoint recorded, is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt_dist.config import ModelConfig


class EvalError(ValueError):
    """Bad input to evaluation; the one-line message names the file (and line) or option."""


@dataclass
class EvalModel:
    model: Any
    cfg: ModelConfig
    ctx: Any
    tokenizer: Any
    fingerprint: str
    """sha256 of the model config and every weight (identical for an export and its run)."""
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def max_length(self) -> int:
        return self.cfg.n_ctx

    @property
    def prefix_id(self) -> int:
        """The token an empty context / the first rolling window conditions on (lm-eval's EOS)."""
        return int(self.tokenizer.eod_id)


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` behind the project's Tokenizer interface (a user's own
    GPT-2 directory without the project's files). Encodes without special tokens, as lm-eval
    does for GPT-2."""

    kind = "hf"

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        try:
            self._hf = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:  # noqa: BLE001 - any transformers failure is one line here
            raise EvalError(f"{path}: unreadable Hugging Face tokenizer ({str(exc).splitlines()[0][:200]})") from None
        if self._hf.eos_token_id is None:
            raise EvalError(f"{path}: the Hugging Face tokenizer has no eos token (needed as the prefix token)")
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
        try:
            d = json.loads(info.read_text())
        except (OSError, ValueError):
            return None, None
        src = d.get("source") or {}
        return src.get("tokenizer_fingerprint") or (d.get("hf_tokenizer") or {}).get("fingerprint"), None
    if not is_run(path):
        return None, None
    try:
        from gpt_dist.export.reader import resolve_checkpoint

        _, manifest = resolve_checkpoint(path, check_hash=False)
    except Exception:  # noqa: BLE001 - load_model_state reports an unreadable checkpoint itself
        return None, None
    return manifest.get("tokenizer_fingerprint"), (manifest.get("config", {}).get("data", {}) or {}).get("tokenizer")


def is_run(path: Path) -> bool:
    """A run directory (it has a config.json too: the run's) or one of its checkpoint tags."""
    return (path / "checkpoints").is_dir() or (path / "manifest.json").is_file()


def load_tokenizer_for(path: Path, override: str | None = None) -> tuple[Any, str | None]:
    """(tokenizer, recorded fingerprint or None) for the model at ``path`` (module docstring)."""
    from gpt_dist.tokenizer import TokenizerError, load_tokenizer

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
            from gpt_dist.tokenizer import GPT2BPETokenizer

            return GPT2BPETokenizer(path / "vocab.json", path / "merges.txt"), recorded
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(path), recorded
    where = override or path
    raise EvalError(f"{where}: no tokenizer found ({'; '.join(errors) or 'none'}); pass --tokenizer DIR")


def check_tokenizer(tok: Any, cfg: ModelConfig, recorded: str | None, where: str) -> None:
    """Refuse a tokenizer that does not belong to the model (see the module docstring)."""
    specials = getattr(tok, "special_ids", {}) or {}
    # ids plain text never encodes to (GPT-1 fine-tuning tokens appended after GPT-2's vocabulary)
    unused = [i for n, i in specials.items() if n != "eod" and i >= cfg.vocab_size]
    plain = int(tok.vocab_size) - len(unused)
    if plain > cfg.vocab_size or int(tok.eod_id) >= cfg.vocab_size:
        raise EvalError(f"{where}: tokenizer/model mismatch: the tokenizer has {plain} tokens (end of document "
                        f"{tok.eod_id}), the model's vocabulary {cfg.vocab_size}")
    fp = getattr(tok, "fingerprint", None)
    if recorded and fp and recorded != fp:
        raise EvalError(f"{where}: tokenizer/model mismatch: the weights were trained with tokenizer "
                        f"{recorded[:12]}, this tokenizer is {str(fp)[:12]}")


def state_fingerprint(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> str:
    """sha256 of the architecture and the weights as fp32 (names, shapes, bytes): an fp32
    export of a bf16 run has the fingerprint of the run's checkpoint."""
    from dataclasses import asdict

    from gpt_dist.config import ARCH_KEYS

    h = hashlib.sha256(json.dumps({k: asdict(cfg)[k] for k in ARCH_KEYS}, sort_keys=True).encode())
    for name in sorted(state):
        t = state[name].detach().cpu()
        t = (t.float() if t.is_floating_point() else t).contiguous()
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_state(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(model config, full native state, source info) of an export, HF dir or run dir."""
    from gpt_dist.export import ExportError
    from gpt_dist.export.loader import load_model_state

    p = Path(path)
    if not p.exists():
        raise EvalError(f"--model: {p}: no such file or directory")
    try:
        cfg, state, _task = load_model_state(p)
    except ExportError as exc:
        raise EvalError(str(exc).splitlines()[0]) from None
    state = {k: v for k, v in state.items() if not k.startswith("task_head.")}  # scored as an LM
    kind = "run" if is_run(p) else "export"
    info: dict[str, Any] = {"path": str(p.resolve()), "kind": kind}
    if kind == "export" and (p / "export.json").is_file():
        try:
            e = json.loads((p / "export.json").read_text())
            info.update(kind=f"export ({e.get('format', '?')})", step=e.get("step"))
        except (OSError, ValueError):
            pass
    elif kind == "export":
        info["kind"] = "hf directory"
    else:
        from gpt_dist.export.reader import resolve_checkpoint

        tag_dir, manifest = resolve_checkpoint(p, check_hash=False)
        info.update(step=manifest.get("step"), checkpoint=tag_dir.name, layout=manifest.get("layout"))
    return cfg, state, info


def parallel_context(tp: int = 1, pp: int = 1, device: str = "auto") -> Any:
    """This process's ParallelContext for evaluation (world = tp * pp * dp), reusing one set
    up already (the training loop's, or a previous call's with the same sizes)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from gpt_dist.config import ParallelConfig
    from gpt_dist.parallel import ParallelContext

    if dist.is_initialized() and ps.model_parallel_is_initialized() and \
            (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) != (tp, pp):
        ps.destroy_model_parallel()
    from gpt_dist import rng

    try:
        ctx = ParallelContext.from_env(ParallelConfig(tp=tp, pp=pp), device=device)
    except ValueError as exc:
        raise EvalError(f"--tp/--pp: {exc}") from None
    rng.seed_all(0)  # the model-parallel RNG tracker the layers enter (no dropout runs: eval mode)
    return ctx


def load_eval_model(path: str | Path, ctx: Any, tokenizer: str | None = None, dtype: str = "fp32",
                    pipeline_partition: str = "parameters",
                    loaded: tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]] | None = None) -> EvalModel:
    """Build and load the model for this rank (module docstring). ``loaded``: a state read
    already (``load_state``), e.g. by a checkpoint sweep."""
    from gpt_dist.export import load_state_into_model
    from gpt_dist.model.build import build_inference_model

    p = Path(path)
    tok, recorded = load_tokenizer_for(p, tokenizer)
    cfg, state, info = loaded if loaded is not None else load_state(p)
    check_tokenizer(tok, cfg, recorded, str(p))
    if cfg.n_head % ctx.tp:
        raise EvalError(f"--tp: {ctx.tp} does not divide the model's {cfg.n_head} heads")
    if ctx.pp > cfg.n_layer:
        raise EvalError(f"--pp: {ctx.pp} stages for {cfg.n_layer} layers")
    fingerprint = state_fingerprint(cfg, state)
    mcfg = ModelConfig(**{**cfg.__dict__, "dropout": 0.0, "attn_dropout": 0.0})
    model = build_inference_model(mcfg, ctx, pipeline_partition)
    load_state_into_model(model, state, ctx.tp_rank, ctx.tp, mcfg)
    del state
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    model = model.to(device=ctx.device, dtype=torch_dtype).eval()
    info.update(tokenizer=getattr(tok, "kind", "?"), tokenizer_fingerprint=getattr(tok, "fingerprint", None),
                dtype=dtype)
    return EvalModel(model, mcfg, ctx, tok, fingerprint, info)
