"""Export formats: file names, ExportError, and the mapping between module names, GPT-2
tensor names, shapes and tensor-parallel split dimensions."""

from __future__ import annotations

import re
from typing import Any

import torch

from gpt_dist.config import FinetuneConfig, ModelConfig
from gpt_dist.pipeline import pipe_name_to_gpt

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


TASK_PREFIX = "task_head."


def task_info(training_config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fine-tuning head an export carries, from the run config's ``finetune`` section:
    ``{"task", "n_out", "label_names", "regression", "lm_coef", "dropout"}`` (None: no head)."""
    ft = (training_config or {}).get("finetune")
    if not ft:
        return None

    f = FinetuneConfig(**ft)
    return {"task": f.task, "n_out": f.head_outputs(), "label_names": f.label_names,
            "regression": f.regression, "lm_coef": f.lm_coef, "dropout": f.classifier_dropout}


def expected_shapes(cfg: ModelConfig, task: dict[str, Any] | None = None) -> dict[str, tuple[int, ...]]:
    """Every native tensor of a model with this config and its full shape (real vocabulary);
    with ``task`` (``task_info``) also GPT-1's head W_y."""
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
    if task is not None:
        out[TASK_PREFIX + "linear.weight"] = (int(task["n_out"]), h)
        out[TASK_PREFIX + "linear.bias"] = (int(task["n_out"]),)
    return out


def check_state(state: dict[str, torch.Tensor], cfg: ModelConfig, where: str,
                task: dict[str, Any] | None = None) -> None:
    want = expected_shapes(cfg, task)
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

