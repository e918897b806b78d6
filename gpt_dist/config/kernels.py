"""The ``kernels`` section of the run config: which fused kernels the model and optimizer use.

Each kernel is ``auto | on | off``. ``off`` is the reference path (plain PyTorch and
megatron-core ops, the CPU default); ``on`` insists on the kernel and refuses, with one line
naming the key, a machine that cannot run it; ``auto`` picks by device and precision:

    Triton kernels (layernorm, bias_gelu, bias_dropout_add, cross_entropy)
                      on for CUDA in bf16/fp16 when Triton imports, else off
    flash_attention   on for CUDA in bf16/fp16 (PyTorch's flash SDPA backend), else off
    fused_adam        on for CUDA without ZeRO-Offload (DeepSpeed's FusedAdam), else off
    compile           off: torch.compile of each block is an option until a GPU run shows
                      it beats the Triton kernels (BENCHMARKS.md)

A section of the same tree, loaded by the same strict loader; ``checks.kernels_for`` resolves
it for a whole run config. Kernel choice is deliberately not an architecture key (``ARCH_KEYS``): the
parameters, their names and the optimizer state are the same with and without any kernel,
so a checkpoint written with kernels resumes without them and vice versa.

``on`` for a Triton kernel on a CPU runs it in Triton's interpreter (``TRITON_INTERPRET=1``,
Triton's own variable, set before Triton is imported): that is how CI checks the kernels
against the reference path; it is far too slow for training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from gpt_dist.config.errors import ConfigError

Choice = Literal["auto", "on", "off"]
TRITON_KERNELS = ("layernorm", "bias_gelu", "bias_dropout_add", "cross_entropy")


def triton_problem() -> str | None:
    """Why Triton cannot be used in this process, or None."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"Triton is not installed ({exc}); pip install -e '.[kernels]'"
    return None


def interpreting() -> bool:
    """Triton's interpreter is on (it runs kernels on CPU tensors, slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class KernelChoice:
    """The resolved switch: what the model (``ModelSpec.kernels``) and the optimizer use.
    The default is the reference path everywhere."""

    layernorm: bool = False
    bias_gelu: bool = False
    bias_dropout_add: bool = False
    cross_entropy: bool = False
    flash_attention: bool = False
    fused_adam: bool = False
    compile: bool = False
    ce_chunk_tokens: int = 2048
    compile_backend: str = "inductor"

    def names_on(self) -> list[str]:
        return [k for k in (*TRITON_KERNELS, "flash_attention", "fused_adam", "compile") if getattr(self, k)]


@dataclass
class KernelsConfig:
    layernorm: Choice = "auto"
    """LayerNorm forward/backward in one Triton kernel each (gpt_dist/kernels/layernorm.py)."""
    bias_gelu: Choice = "auto"
    """The MLP's c_fc bias add + GELU(tanh) fused (forward and backward)."""
    bias_dropout_add: Choice = "auto"
    """Bias add + dropout + residual add after each attention/MLP projection; the dropout
    mask comes from the same RNG region as the unfused path."""
    cross_entropy: Choice = "auto"
    """Vocabulary-parallel cross-entropy fused with the tied output layer, in chunks of
    ce_chunk_tokens tokens: the float32 logits of the whole vocabulary never exist."""
    flash_attention: Choice = "auto"
    """Force PyTorch's flash SDPA backend (an error, not a silent fall-back to math)."""
    fused_adam: Choice = "auto"
    """DeepSpeed's FusedAdam (multi-tensor AdamW) instead of torch.optim.AdamW."""
    compile: Choice = "auto"
    """torch.compile each transformer block (in place: parameter names do not change)."""
    ce_chunk_tokens: int = 2048
    """Tokens per chunk of the fused cross-entropy (its logits chunk is tokens x vocab/tp)."""
    compile_backend: str = "inductor"
    """torch.compile backend for ``compile``."""

    def __post_init__(self) -> None:
        if self.ce_chunk_tokens < 1:
            raise ConfigError(f"kernels.ce_chunk_tokens: must be >= 1, got {self.ce_chunk_tokens}")

    def resolve(self, device: str, precision: str, *, attn_dropout: float = 0.0,
                offload: bool = False, plan: bool = False) -> KernelChoice:
        """``auto`` decided for ``device`` ("cpu"/"cuda", already resolved) and ``precision``;
        raises ConfigError naming the key when an ``on`` cannot run here. ``plan`` (the dry
        run, planning for another machine): assume that machine has Triton."""
        cuda, half = device == "cuda", precision in ("bf16", "fp16")
        out: dict[str, bool] = {}
        problem = None if plan else triton_problem()
        for name in TRITON_KERNELS:
            want = getattr(self, name)
            if want == "on" and not plan:
                if problem:
                    raise ConfigError(f"kernels.{name}: on, but {problem}")
                if not cuda and not interpreting():
                    raise ConfigError(f"kernels.{name}: on needs a CUDA device, or TRITON_INTERPRET=1 "
                                 "(Triton's interpreter, for tests) on a CPU; set it auto or off")
            out[name] = want == "on" or (want == "auto" and cuda and half and problem is None)
        if self.flash_attention == "on":
            if cuda and not half:
                raise ConfigError(f"kernels.flash_attention: the flash backend has no {precision} kernel on "
                             "CUDA; use training.precision bf16/fp16 or set it auto/off")
            if not cuda and attn_dropout > 0:
                raise ConfigError(f"kernels.flash_attention: PyTorch's CPU flash kernel has no dropout, and "
                             f"model.attn_dropout={attn_dropout}; set it auto/off or attn_dropout 0")
        out["flash_attention"] = self.flash_attention == "on" or (self.flash_attention == "auto" and cuda and half)
        if self.fused_adam == "on" and offload:
            raise ConfigError("kernels.fused_adam: on, but ZeRO-Offload moves the optimizer to the CPU "
                         "(DeepSpeedCPUAdam); set it auto or off")
        out["fused_adam"] = self.fused_adam == "on" or (self.fused_adam == "auto" and cuda and not offload)
        out["compile"] = self.compile == "on"
        return KernelChoice(**out, ce_chunk_tokens=self.ce_chunk_tokens, compile_backend=self.compile_backend)
