"""DeepSpeed's FusedAdam (multi-tensor AdamW), with an optimizer state torch.optim.AdamW reads.

``kernels.fused_adam`` must not change what a checkpoint holds: a run trained with it resumes
with torch's AdamW and vice versa. DeepSpeed 0.19's ``FusedAdam.step`` keeps ``state['step']``
as a Python int and increments it on the *last* parameter of each dtype group only (the
others stay at the count they were created with), and it cannot read the tensor steps torch's
AdamW saves. This subclass keeps DeepSpeed's kernel (``multi_tensor_adam``: the CUDA op on a
GPU, DeepSpeed's C++ op on a CPU) and does the bookkeeping per parameter the way torch does:
every parameter that had a gradient gets ``state['step']`` = the new count, stored as a
float32 CPU tensor (torch's non-fused format), so either optimizer loads the other's state
and continues with the same step count, moments and hyperparameters.

ZeRO accepts optimizers by exact type: ``training/engine.py`` registers this class
(``deepspeed_compat.register_zero_optimizer``) when it builds one, not this module at import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from deepspeed.ops.adam import FusedAdam

from gpt_dist import deepspeed_compat


class FusedAdamW(FusedAdam):
    """``torch.optim.AdamW(params, lr, betas, eps, weight_decay)`` on DeepSpeed's fused kernel."""

    def __init__(self, params: Any, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         adam_w_mode=True, bias_correction=True)
        # torch's AdamW takes a loaded checkpoint's param groups as they are and fills in missing
        # keys with Adam's defaults, decoupled_weight_decay=False among them: without these keys
        # it would resume as Adam with L2 decay. fused mirrors build_optimizer's torch AdamW.
        cuda = any(p.is_cuda for g in self.param_groups for p in g["params"])
        for group in self.param_groups:
            for key, value in (("amsgrad", False), ("maximize", False), ("foreach", None), ("capturable", False),
                               ("differentiable", False), ("fused", cuda or None), ("decoupled_weight_decay", True)):
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, **_: Any) -> Any:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            by_dtype: dict[torch.dtype, list[list[torch.Tensor]]] = {}
            steps: list[int] = []
            with_grad = [p for p in group["params"] if p.grad is not None]
            for p in with_grad:
                if p.grad.is_sparse:
                    raise RuntimeError("FusedAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                steps.append(int(state["step"]))
                lists = by_dtype.setdefault(p.dtype, [[], [], [], []])
                for i, t in enumerate((p.grad, p, state["exp_avg"], state["exp_avg_sq"])):
                    lists[i].append(t)
            if not with_grad:
                continue
            if len(set(steps)) != 1:  # a state DeepSpeed's own step left behind: counts differ
                raise RuntimeError(f"FusedAdamW: parameters of one group at different steps {sorted(set(steps))}")
            step = steps[0] + 1
            for dtype, lists in by_dtype.items():
                if dtype not in (torch.float16, torch.bfloat16, torch.float32):
                    raise RuntimeError(f"FusedAdamW supports fp16, bf16 and fp32, not {dtype}")
                deepspeed_compat.fused_adam_apply(self, lists, lr=group["lr"], beta1=beta1, beta2=beta2,
                                                  eps=group["eps"], step=step, weight_decay=group["weight_decay"])
            for p in with_grad:
                self.state[p]["step"] = torch.tensor(float(step))
            group["step"] = step
        return loss

