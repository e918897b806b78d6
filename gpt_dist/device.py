"""What the training device can do: which of ``training.precision`` it runs.

DeepSpeed refuses a precision the device lacks only when the engine is built ("Type fp16 is
not supported on your device."), after every rank has started and joined the process group.
Config validation asks the same question first, through the same DeepSpeed accelerator
checks, so the refusal is one config error before anything starts.

``supported_precisions`` is the one lookup (tests monkeypatch it to force either answer);
``precision_problem`` turns it into the reason a precision cannot run here, or None.
"""

from __future__ import annotations

import os
import platform
from functools import cache

PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_device(device: str) -> str:
    """``training.device`` as ParallelContext.from_env resolves it: auto -> cuda if available."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() is only 'x86_64' on Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass

    return platform.processor() or platform.machine() or "unknown CPU"


@cache
def supported_precisions(device: str) -> tuple[str, tuple[str, ...]]:
    """(a description of ``device``, the precisions it runs), as DeepSpeed decides them.

    The accelerator class for the device is built directly rather than through
    ``get_accelerator()``: that call caches the process-wide accelerator, which
    ParallelContext picks later (DS_ACCELERATOR=cpu for CPU training on a GPU machine).
    DeepSpeed's CPU accelerator has bf16 always and fp16 only where oneDNN has fp16 kernels
    (AVX512-FP16/AMX-FP16 CPUs); its CUDA accelerator asks the GPU's compute capability.
    """
    device = resolve_device(device)
    if device == "cuda":
        import torch
        from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

        acc = CUDA_Accelerator()
        desc = f"cuda ({torch.cuda.get_device_name()})"
    else:
        # What ParallelContext.from_env sets for a CPU run anyway; without it, importing
        # DeepSpeed auto-detects the accelerator and logs a warning line about it.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        acc = CPU_Accelerator()
        desc = f"cpu ({_cpu_name()})"
    ok = ["fp32"]
    if acc.is_bf16_supported():
        ok.append("bf16")
    if acc.is_fp16_supported():
        ok.append("fp16")
    return desc, tuple(ok)


def precision_problem(precision: str, device: str) -> str | None:
    """Why ``precision`` cannot train on ``device`` (one line), or None when it can."""
    if precision == "fp32":  # every device runs fp32; no need to import DeepSpeed for it
        return None
    desc, ok = supported_precisions(device)
    if precision in ok:
        return None
    return (f"{precision} is not supported by DeepSpeed on this device, {desc}; "
            f"use one of {', '.join(ok)} here")
