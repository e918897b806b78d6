"""Every private DeepSpeed attribute, patch and registration the project relies on, in one
module, each with a test (``tests/test_deepspeed_compat.py``) that fails when the installed
DeepSpeed changes the behaviour relied on.

Why a module of its own: DeepSpeed's public API does not cover a few things the project
needs; each use below says what it lacks. Nothing here runs at import time: callers ask for
each patch or registration explicitly, when they build what needs it.
"""

from __future__ import annotations

from typing import Any


def skip_shm_comm_build() -> None:
    """Do not JIT-build DeepSpeed's shared-memory all-reduce op on CPU.

    DeepSpeed's TorchBackend compiles it at start-up (60-130 s on a 2-core machine, once per
    fresh cache) but only its inference all-reduce ever uses it; training on CPU/gloo never
    does. No public switch exists: ``deepspeed.ops.__compatible_ops__`` is what its
    ``TorchBackend`` consults."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def pipeline_layers(module: Any) -> list[Any]:
    """This stage's layers of a DeepSpeed ``PipelineModule``, in order: modules, and
    ``functools.partial`` objects for a ``TiedLayerSpec`` with a ``forward_fn``.

    ``PipelineModule`` builds only this stage's layers but exposes them only as the private-
    by-convention ``forward_funcs`` list (no public accessor)."""
    return list(module.forward_funcs)
