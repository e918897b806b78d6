"""Counts the fused kernels' calls in a training process (test-only instrumentation).

``install(path)`` wraps the kernel entry points the model calls (looked up on their modules
at call time, so wrapping the module attribute catches every call); at exit each rank writes
``{kernel: calls}`` to ``path.rank{R}.json``. The pp=1 / pp=2 test sums them over ranks: the
same switches must run the same kernels the same number of times at any pp.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
from collections import Counter
from pathlib import Path

KERNELS = {
    "gpt_dist.kernels.layernorm": "layer_norm",
    "gpt_dist.kernels.bias_gelu": "bias_gelu",
    "gpt_dist.kernels.bias_dropout_add": "bias_dropout_add",
    "gpt_dist.kernels.cross_entropy": ("fused_linear_cross_entropy", "vocab_parallel_cross_entropy"),
}


def install(path: str) -> None:
    import importlib

    counts: Counter[str] = Counter()
    for mod_name, names in KERNELS.items():
        mod = importlib.import_module(mod_name)
        for name in (names,) if isinstance(names, str) else names:
            fn = getattr(mod, name)

            @functools.wraps(fn)
            def counted(*args, __fn=fn, __name=name, **kwargs):  # type: ignore[no-untyped-def]
                counts[__name] += 1
                return __fn(*args, **kwargs)

            setattr(mod, name, counted)

    def dump() -> None:
        rank = os.environ.get("RANK", "0")
        Path(f"{path}.rank{rank}.json").write_text(json.dumps(dict(counts)))

    atexit.register(dump)
