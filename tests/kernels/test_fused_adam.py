"""kernels.fused_adam: DeepSpeed's FusedAdam kernel with torch AdamW's semantics and state.

On a CPU the DeepSpeed op is its C++ ``fused_adam`` (JIT-built once into
~/.cache/torch_extensions: about two minutes of compiling on 2 cores the first time), on a GPU
its CUDA multi-tensor kernel; the bookkeeping tested here is the same for both.
"""

from __future__ import annotations

import copy

import torch

from tests.kernels.conftest import DEVICE, gen, rel_err

HP = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}


def _params(g: torch.Generator) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(*s, generator=g).to(DEVICE)) for s in ((7, 5), (5,), (3, 3, 2))]


def _groups(ps: list[torch.nn.Parameter]) -> list[dict]:
    return [{"params": [ps[0], ps[2]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}]


def _steps(opt: torch.optim.Optimizer, ps: list[torch.nn.Parameter], grads: list[list[torch.Tensor]]) -> None:
    for gs in grads:
        for p, gr in zip(ps, gs, strict=True):
            p.grad = gr.clone()
        opt.step()


def test_fused_adamw_matches_torch_adamw_and_their_states_interchange():
    from gpt_dist.kernels.optim import FusedAdamW

    g = gen()
    start = _params(g)
    grads = [[torch.randn(p.shape, generator=g).to(DEVICE) for p in start] for _ in range(6)]

    ref_p = copy.deepcopy(start)
    ref = torch.optim.AdamW(_groups(ref_p), **HP)
    _steps(ref, ref_p, grads)                                  # 6 steps of torch's AdamW

    fus_p = copy.deepcopy(start)
    fus = FusedAdamW(_groups(fus_p), **HP)
    _steps(fus, fus_p, grads[:3])
    assert all(int(fus.state[p]["step"]) == 3 for p in fus_p)  # every parameter, not just the last
    # FusedAdamW's state -> torch AdamW (a run trained with kernels resumed without them)
    a_p = copy.deepcopy(fus_p)
    a = torch.optim.AdamW(_groups(a_p), **HP)
    a.load_state_dict(copy.deepcopy(fus.state_dict()))
    assert all(grp["decoupled_weight_decay"] for grp in a.param_groups)  # still AdamW, not Adam + L2
    _steps(a, a_p, grads[3:])
    # torch AdamW's state -> FusedAdamW (and vice versa)
    t_p = copy.deepcopy(start)
    t = torch.optim.AdamW(_groups(t_p), **HP)
    _steps(t, t_p, grads[:3])
    b_p = copy.deepcopy(t_p)
    b = FusedAdamW(_groups(b_p), **HP)
    b.load_state_dict(copy.deepcopy(t.state_dict()))
    _steps(b, b_p, grads[3:])
    _steps(fus, fus_p, grads[3:])                              # and FusedAdamW straight through

    for run in (fus_p, a_p, b_p):
        for p, r in zip(run, ref_p, strict=True):
            assert rel_err(p, r) < 1e-6
    # a reset step count (bias correction restarting) would be visible at this tolerance
    fresh_p = copy.deepcopy(t_p)
    fresh = torch.optim.AdamW(_groups(fresh_p), **HP)
    _steps(fresh, fresh_p, grads[3:])
    assert max(rel_err(p, r) for p, r in zip(fresh_p, ref_p, strict=True)) > 1e-4
