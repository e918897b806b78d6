"""What ``gpt_dist/deepspeed_compat.py`` relies on in the installed DeepSpeed, checked on real
engines and DeepSpeed's own functions: each test fails when DeepSpeed changes the private
behaviour one compat function depends on (an attribute moved, a method no longer called, a
layout changed), instead of a training run going silently wrong.

One process, world size 1 on CPU/gloo; engines are tiny ``nn.Linear`` models.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gpt_dist import deepspeed_compat as compat


@pytest.fixture(scope="module")
def ctx():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from gpt_dist.config import ParallelConfig
    from gpt_dist.parallel import ParallelContext

    with ParallelContext.from_env(ParallelConfig(), device="cpu") as c:
        yield c


def _ds_config(stage: int = 0, *, clip: float = 0.0, precision: str = "fp32") -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": clip,
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 10_000, "allgather_bucket_size": 10_000,
                                 "stage3_prefetch_bucket_size": 10_000},
           "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def _engine(stage: int = 0, *, clip: float = 0.0, precision: str = "fp32", lr: float = 0.1,
            optimizer_cls: type = torch.optim.AdamW, gate=None):
    import deepspeed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    opt = optimizer_cls(model.parameters(), lr=lr, weight_decay=0.0)
    if gate is not None:
        compat.gate_optimizer_step(opt, gate)
    eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_ds_config(stage, clip=clip, precision=precision),
                                   dist_init_required=False)
    return eng, opt


def _batch(eng, seed: int = 1) -> torch.Tensor:
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(seed))
    return x.to(next(eng.module.parameters()).dtype)


def _step(eng, seed: int = 1, scale: float = 1.0) -> None:
    loss = eng(_batch(eng, seed)).float().pow(2).sum() * scale
    eng.backward(loss)
    eng.step()


def _weights(eng) -> list[torch.Tensor]:
    import deepspeed

    params = list(eng.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return [p.detach().float().clone() for p in params]


# --------------------------------------------------------------------------- start-up


def test_skip_shm_comm_build_stops_the_torch_backend_building_its_op():
    import deepspeed

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # the module, not the torch it imports
    compat.skip_shm_comm_build()
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    # what TorchBackend calls at start-up: with the flag off it returns without building
    assert ds_torch.build_shm_op() is None


# --------------------------------------------------------------------------- engine build


class _SubclassedAdamW(torch.optim.AdamW):
    """A subclass of a ZeRO-supported optimizer, as FusedAdamW is of FusedAdam."""


def test_register_zero_optimizer_admits_exactly_that_class(ctx):
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS, is_zero_supported_optimizer

    assert _SubclassedAdamW not in ZERO_SUPPORTED_OPTIMIZERS
    with pytest.raises(AssertionError, match="untested ZeRO Optimizer"):  # ZeRO refuses it by exact type
        _engine(1, optimizer_cls=_SubclassedAdamW)
    compat.register_zero_optimizer(_SubclassedAdamW)
    compat.register_zero_optimizer(_SubclassedAdamW)  # idempotent
    try:
        assert ZERO_SUPPORTED_OPTIMIZERS.count(_SubclassedAdamW) == 1
        assert is_zero_supported_optimizer(_SubclassedAdamW([nn.Parameter(torch.zeros(1))]))
        eng, _ = _engine(1, optimizer_cls=_SubclassedAdamW)
        before = _weights(eng)
        _step(eng)
        assert any(not torch.equal(a, b) for a, b in zip(before, _weights(eng), strict=True))
    finally:
        ZERO_SUPPORTED_OPTIMIZERS.remove(_SubclassedAdamW)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_gate_optimizer_step_is_what_every_zero_stage_calls(ctx, stage):
    calls: list[int] = []
    allow = {"step": False}

    def gate() -> bool:
        calls.append(1)
        return allow["step"]

    eng, _ = _engine(stage, gate=gate)
    before = _weights(eng)
    _step(eng)
    assert len(calls) == 1, f"ZeRO-{stage}: the client optimizer's step was called {len(calls)} times"
    after_skip = _weights(eng)
    assert all(torch.equal(a, b) for a, b in zip(before, after_skip, strict=True)), "gated step changed weights"
    allow["step"] = True
    _step(eng)
    assert len(calls) == 2
    assert any(not torch.equal(a, b) for a, b in zip(after_skip, _weights(eng), strict=True))


def test_keep_fp32_clip_norm_records_the_norm_deepspeed_drops(ctx):
    eng, _ = _engine(0, clip=1e-3)
    _step(eng)
    assert eng.get_global_grad_norm() is None  # DeepSpeed still drops it (else: remove the patch)

    eng, _ = _engine(0, clip=1e-3)
    compat.keep_fp32_clip_norm(eng)
    loss = eng(_batch(eng)).float().pow(2).sum()
    eng.backward(loss)
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in eng.module.parameters()])).item()
    before = _weights(eng)
    eng.step()
    norm = eng.get_global_grad_norm()
    assert isinstance(norm, float) and norm == pytest.approx(expected, rel=1e-5)
    assert norm > 1e-3  # so the step was clipped: AdamW's first step moves each weight by about lr
    assert any(not torch.equal(a, b) for a, b in zip(before, _weights(eng), strict=True))


@pytest.mark.slow  # builds DeepSpeed's fused_adam C++ op on a CPU (about two minutes, once per cache)
def test_fused_adam_apply_is_one_adamw_step():
    from deepspeed.ops.adam import FusedAdam

    g = torch.Generator().manual_seed(3)
    p = nn.Parameter(torch.randn(4, 3, generator=g))
    grad = torch.randn(4, 3, generator=g)
    ref = nn.Parameter(p.detach().clone())
    ref.grad = grad.clone()
    torch.optim.AdamW([ref], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1).step()
    opt = FusedAdam([p], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, adam_w_mode=True)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    compat.fused_adam_apply(opt, [[grad], [p.data], [m], [v]], lr=0.01, beta1=0.9, beta2=0.95, eps=1e-8,
                            step=1, weight_decay=0.1)
    assert torch.allclose(p.data, ref.data, atol=1e-6, rtol=1e-5)
    assert torch.allclose(m, 0.1 * grad) and torch.allclose(v, 0.05 * grad * grad)


# --------------------------------------------------------------------------- during training


def test_loss_scale_reads_each_optimizer_wrappers_scale(ctx):
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    eng, _ = _engine(0)
    assert compat.loss_scale(eng) == 1.0  # fp32: no loss scaler
    # the two places DeepSpeed keeps the scale: the ZeRO-0 fp16 optimizer's loss_scale_config, ZeRO's cur_scale
    fp16_zero0 = SimpleNamespace(optimizer=SimpleNamespace(loss_scale_config=SimpleNamespace(cur_scale=1024.0)))
    zero = SimpleNamespace(optimizer=SimpleNamespace(cur_scale=256.0))
    assert compat.loss_scale(SimpleNamespace(_get_optimizer_loss_scale=functools.partial(
        DeepSpeedEngine._get_optimizer_loss_scale, fp16_zero0))) == 1024.0
    assert compat.loss_scale(SimpleNamespace(_get_optimizer_loss_scale=functools.partial(
        DeepSpeedEngine._get_optimizer_loss_scale, zero))) == 256.0
    assert isinstance(DeepSpeedZeroOptimizer.cur_scale, property)
    assert isinstance(DeepSpeedZeroOptimizer_Stage3.cur_scale, property)


def test_refresh_fp32_master_weights_makes_the_next_step_start_from_loaded_weights(ctx):
    from gpt_dist.device import precision_problem

    if problem := precision_problem("bf16", "cpu"):  # CI's CPU may lack it: gate on the capability
        pytest.skip(problem)
    def load_and_step(refresh: bool) -> list[torch.Tensor]:
        eng, _ = _engine(1, precision="bf16", lr=0.0)
        with torch.no_grad():
            for p in eng.module.parameters():
                p.fill_(0.5)  # "loaded" weights, exactly representable in bf16
        if refresh:
            compat.refresh_fp32_master_weights(eng)
        _step(eng)  # lr 0: the masters do not move, and are copied back into the module
        return _weights(eng)

    assert all(torch.equal(w, torch.full_like(w, 0.5)) for w in load_and_step(True))
    # without it the step writes the masters of the initialisation back: the loaded weights are lost
    assert not all(torch.equal(w, torch.full_like(w, 0.5)) for w in load_and_step(False))


def test_checkpoint_writes_through_sees_every_file_deepspeed_writes(ctx, tmp_path):
    eng, _ = _engine(1)
    _step(eng)
    seen: list[str] = []

    def write(save, state_dict, path):
        seen.append(os.path.basename(path))
        return save(state_dict, path)

    ce = eng.checkpoint_engine
    with compat.checkpoint_writes_through(eng, write):
        eng.save_checkpoint(str(tmp_path), tag="t1", save_latest=False)
    written = sorted(p.name for p in (tmp_path / "t1").iterdir())
    assert written and sorted(seen) == written  # model and ZeRO optimizer states, each through write()
    assert "save" not in vars(ce)  # DeepSpeed's own save is back

    def failing(save, state_dict, path):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError), compat.checkpoint_writes_through(eng, failing):
        eng.save_checkpoint(str(tmp_path), tag="t2", save_latest=False)
    assert "save" not in vars(ce)  # restored after an error too


# --------------------------------------------------------------------------- pipeline module


def _half(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return 0.5 * layer(x)


def test_pipeline_layers_and_loss_fn_are_what_the_engine_runs(ctx):
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    calls: list[float] = []

    def loss_fn(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = (out - labels).pow(2).mean()
        calls.append(float(loss))
        return loss

    torch.manual_seed(0)
    module = PipelineModule(layers=[TiedLayerSpec("t", nn.Linear, 4, 4), LayerSpec(nn.Linear, 4, 4),
                                    TiedLayerSpec("t", nn.Linear, 4, 4, forward_fn=_half)],
                            loss_fn=loss_fn, num_stages=1, partition_method="uniform")
    layers = compat.pipeline_layers(module)
    assert len(layers) == 3
    tied = module.tied_modules["t"]
    assert layers[0] is tied and isinstance(layers[1], nn.Linear) and layers[1] is not tied
    assert isinstance(layers[2], functools.partial) and layers[2].func is _half and layers[2].args == (tied,)
    x = torch.randn(2, 4)
    assert torch.equal(layers[2](x), 0.5 * tied(x))
    assert compat.pipeline_loss_fn(module) is loss_fn

    eng, *_ = deepspeed.initialize(model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
                                   config={**_ds_config(0), "optimizer": {"type": "AdamW", "params": {"lr": 0.01}}},
                                   dist_init_required=False)
    assert compat.pipeline_loss_fn(eng.module) is loss_fn
    data = iter([(torch.randn(2, 4), torch.randn(2, 4))])
    loss = eng.train_batch(data_iter=data)
    # the engine ran the layers in pipeline_layers' order and then this very loss function
    assert len(calls) == 1 and float(loss) == pytest.approx(calls[0])


@pytest.mark.parametrize("prepared", [True, False])
def test_prepare_pipeline_forward_makes_a_checkpointed_pipeline_module_run_its_layers(ctx, prepared):
    """A ``PipelineModule`` with activation checkpointing, run outside DeepSpeed's pipeline
    engine: unprepared, its forward runs no layer and returns the input."""
    from deepspeed.pipe import LayerSpec, PipelineModule

    torch.manual_seed(0)
    module = PipelineModule(layers=[LayerSpec(nn.Linear, 4, 4), LayerSpec(nn.Linear, 4, 4)], num_stages=1,
                            partition_method="uniform", activation_checkpoint_interval=1)
    if prepared:
        compat.prepare_pipeline_forward(module)
    x = torch.randn(2, 4)
    layers = compat.pipeline_layers(module)
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    assert torch.allclose(out, layers[1](layers[0](x))) == prepared
    assert torch.equal(out, x) != prepared


# --------------------------------------------------------------------------- reading ZeRO files


def _model_state(shapes: dict[str, tuple[int, ...]]):
    from deepspeed.utils.zero_to_fp32 import zero_model_state

    return zero_model_state(buffers={}, param_shapes=[{k: torch.Size(v) for k, v in shapes.items()}],
                            shared_params=[], ds_version=None, frozen_param_shapes=None, frozen_param_fragments=None)


SHAPES = {"a.weight": (3, 2), "a.bias": (5,), "b.weight": (2, 2)}


def _full() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}


def test_zero3_merge_params_inverts_zero3_partitioning():
    world, full = 2, _full()
    flat: list[list[torch.Tensor]] = [[], []]
    for t in full.values():  # per parameter: ceil(numel / world) elements per rank, the last padded
        part = -(-t.numel() // world)
        padded = torch.cat([t.flatten(), torch.zeros(part * world - t.numel())])
        for r in range(world):
            flat[r].append(padded[r * part:(r + 1) * part])
    groups = [[torch.cat(f)] for f in flat]
    out = compat.zero3_merge_params(world, groups, [_model_state(SHAPES)] * world)
    assert list(out) == list(SHAPES)
    for k, t in full.items():
        assert torch.is_tensor(out[k]) and torch.equal(out[k], t), k


def test_zero2_merge_params_inverts_zero12_partitioning():
    world, full = 2, _full()
    vec = torch.cat([t.flatten() for t in full.values()])  # 15 elements, padded to 2 * world
    vec = torch.cat([vec, torch.zeros(-(-vec.numel() // (2 * world)) * 2 * world - vec.numel())])
    half = vec.numel() // world
    groups = [[vec[r * half:(r + 1) * half]] for r in range(world)]
    out = compat.zero2_merge_params(world, groups, [_model_state(SHAPES)] * world)
    assert list(out) == list(SHAPES)
    for k, t in full.items():
        assert torch.equal(out[k], t), k


# --------------------------------------------------------------------------- layout-free state


def test_keep_fp32_clip_norm_counts_a_pipeline_replicated_copy_once(ctx):
    """The tied embedding's copy on the last pipeline stage (``ds_pipe_replicated``) is left
    out of the norm but clipped with the same coefficient; DeepSpeed's own ``clip_grad_norm_``
    still counts it (else: drop that part of the patch)."""
    from deepspeed.runtime.utils import clip_grad_norm_

    eng, _ = _engine(0, clip=1e-3)
    compat.keep_fp32_clip_norm(eng)
    params = list(eng.module.parameters())
    params[0].ds_pipe_replicated = True
    loss = eng(_batch(eng)).float().pow(2).sum()
    eng.backward(loss)
    grads = [p.grad.detach().clone() for p in params]
    counted = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads[1:]])).item()
    everything = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
    copies = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for c, g, p in zip(copies, grads, params, strict=True):
        c.grad, c.ds_pipe_replicated = g.clone(), getattr(p, "ds_pipe_replicated", False)
    theirs = float(clip_grad_norm_(copies, max_norm=float("inf")))
    assert theirs == pytest.approx(everything, rel=1e-6) and everything > counted * (1 + 1e-3)
    eng.clip_fp32_gradients()
    assert eng.get_global_grad_norm() == pytest.approx(counted, rel=1e-6)
    coef = 1e-3 / (counted + 1e-6)
    for p, g in zip(params, grads, strict=True):  # every gradient scaled, the copy included
        torch.testing.assert_close(p.grad, g * coef, rtol=1e-6, atol=0)


def _two_group_zero1():
    import deepspeed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    groups = [{"params": [m.weight for m in model], "weight_decay": 0.1},
              {"params": [m.bias for m in model], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=0.1)
    eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_ds_config(1), dist_init_required=False)
    return eng, opt


def test_link_optimizer_state_reaches_every_param_groups_state(ctx):
    """ZeRO-1/2 link the fragments' optimizer state after the first group's step only: the
    public getter fails for a parameter of the second group until ``link_optimizer_state``."""
    from deepspeed.utils import safe_get_full_optimizer_state

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))  # the same init: the gradients
    eng, _ = _two_group_zero1()
    plain(_batch(eng)).float().pow(2).sum().backward()
    _step(eng)
    bias = eng.module[1].bias
    with pytest.raises(ValueError, match="exp_avg not found"):  # DeepSpeed's bug (else: drop the relink)
        safe_get_full_optimizer_state(bias, "exp_avg")
    compat.link_optimizer_state(eng)
    got = safe_get_full_optimizer_state(bias, "exp_avg")
    torch.testing.assert_close(got, (1 - 0.9) * plain[1].bias.grad, rtol=1e-6, atol=1e-9)  # Adam's first moment
    weight = safe_get_full_optimizer_state(eng.module[0].weight, "exp_avg_sq")
    torch.testing.assert_close(weight, (1 - 0.999) * plain[0].weight.grad ** 2, rtol=1e-5, atol=1e-12)


def test_engine_counters_and_loss_scaler_state_round_trip(ctx):
    eng, _ = _engine(1)
    _step(eng)
    assert compat.engine_counters(eng) == {"global_steps": 1, "global_samples": 2, "skipped_steps": 0}
    compat.set_engine_counters(eng, {"global_steps": 7, "global_samples": 14, "skipped_steps": 2})
    assert (eng.global_steps, eng.global_samples, eng.skipped_steps) == (7, 14, 2)
    assert compat.loss_scaler_state(eng) is None  # fp32: no loss scaler to carry
    compat.set_loss_scaler_state(eng, None)


def test_loss_scaler_state_round_trips_deepspeeds_dynamic_scaler(ctx):
    """fp16 needs a GPU here; the scaler is DeepSpeed's own class, held where its optimizers hold it."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    def engine():
        return SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=DynamicLossScaler(
            init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
            consecutive_hysteresis=False)))

    a = engine()
    a.optimizer.loss_scaler.update_scale(overflow=True)  # a skipped step: halved (hysteresis 2 -> 1)
    a.optimizer.loss_scaler.update_scale(overflow=True)
    state = compat.loss_scaler_state(a)
    assert state is not None and state["cur_scale"] < 2.0**16 and state["cur_iter"] == 2
    b = engine()
    compat.set_loss_scaler_state(b, state)
    assert compat.loss_scaler_state(b) == state


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_optimizer_stepped_tensors_are_what_the_inner_optimizer_steps(ctx, stage):
    """ZeRO-3 puts its flat fp32 partitions into the inner optimizer's groups only while it
    steps them; the others keep them there. Adam state appears for exactly these tensors."""
    eng, opt = _engine(stage)
    tensors = compat.optimizer_stepped_tensors(eng, opt)
    in_groups = [t for g in opt.param_groups for t in g["params"]]
    if stage == 3:
        assert in_groups == [] and tensors  # (else: read them from the groups)
    else:
        assert [id(t) for t in tensors] == [id(t) for t in in_groups]
    _step(eng)
    assert {id(t) for t in opt.state} == {id(t) for t in tensors}


# --------------------------------------------------------------------------- pipeline stage engines


def _unmanaged(stage: int, gas: int = 2):
    """A stage-like engine: ZeRO ``stage``, the schedule owns accumulation (issue 20)."""
    import deepspeed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    ref = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = {**_ds_config(stage), "gradient_accumulation_steps": gas, "managed_gradient_accumulation": False,
           "zero_allow_untested_optimizer": True}  # SGD: a gradient-scale error shows 1:1
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
    return eng, ref


def _reference_sgd(ref: list[torch.Tensor], xs: list[torch.Tensor]) -> list[torch.Tensor]:
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    with torch.no_grad():
        for p, r in zip(model.parameters(), ref, strict=True):
            p.copy_(r)
    sum(model(x).pow(2).sum() for x in xs).div(len(xs)).backward()
    return [(p - 0.1 * p.grad).detach() for p in model.parameters()]


@pytest.mark.parametrize("reset", [True, False])
def test_start_stage_backward_counts_back_to_back_backwards(ctx, reset):
    """Two forwards in flight, then two backwards (a 1F1B stage's cool-down, GPipe): with the
    reset every micro-batch's gradient counts once; without it ZeRO-3 never reduces the second
    backward and fails in step() (on a GPU it would drop those gradients silently)."""
    eng, ref = _unmanaged(3)
    xs = [_batch(eng, 1), _batch(eng, 2)]
    outs = [eng(x).pow(2).sum() for x in xs]
    try:
        for out in outs:
            if reset:
                compat.start_stage_backward(eng)
            torch.autograd.backward(out)
        eng.step()
    except RuntimeError:
        assert not reset
        return
    got, want = _weights(eng), _reference_sgd(ref, xs)
    err = max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))
    assert (err <= 1e-6) == reset, err


def test_skip_zero3_trace_check_replaces_the_world_broadcast(ctx):
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc
    from deepspeed.runtime.zero import utils

    assert ppc.assert_ints_same_as_other_ranks is utils.assert_ints_same_as_other_ranks  # what DeepSpeed calls
    try:
        compat.skip_zero3_trace_check()
        assert ppc.assert_ints_same_as_other_ranks([1, 2]) is None
        eng, _ = _unmanaged(3)
        eng(_batch(eng)).pow(2).sum().backward()
        eng.step()  # ZeRO-3 still trains with the check skipped
    finally:
        ppc.assert_ints_same_as_other_ranks = utils.assert_ints_same_as_other_ranks


@pytest.mark.parametrize("wrapped", [True, False])
def test_zero3_norm_by_tp_rank_counts_a_pipeline_replicated_copy_once(ctx, wrapped):
    eng, _ = _unmanaged(3, gas=1)
    params = list(eng.module.parameters())
    params[0].ds_pipe_replicated = True  # as the last stage's tied copy
    if wrapped:
        compat.zero3_norm_by_tp_rank(eng, tp_rank=0)
        assert eng.optimizer.model_parallel_rank == 0
    x = _batch(eng)
    eng(x).pow(2).sum().backward()
    from deepspeed.utils import safe_get_full_grad

    grads = [safe_get_full_grad(p).clone() for p in params]
    eng.step()
    rest = torch.stack([g.norm() for g in grads[1:]]).norm()
    full = torch.stack([g.norm() for g in grads]).norm()
    assert abs(eng.get_global_grad_norm() - float(rest if wrapped else full)) <= 1e-5 * float(full)
    assert float(full) > float(rest) * 1.01  # the copy's gradient is not negligible


def test_before_zero_step_reads_and_writes_unmanaged_zero2_gradients(ctx):
    """ZeRO-2 without managed accumulation: the public full-gradient API refuses before
    ``step()``, works inside it before the norm; a write there is what the update uses."""
    from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

    eng, ref = _unmanaged(2, gas=1)
    params = list(eng.module.parameters())
    x = _batch(eng)
    eng(x).pow(2).sum().backward()
    with pytest.raises(ValueError, match="only available"):
        safe_get_full_grad(params[0])
    seen = []

    def double_first() -> None:
        g = safe_get_full_grad(params[0]).clone()
        seen.append(g)
        safe_set_full_grad(params[0], 2 * g)

    compat.before_zero_step(eng, double_first)
    eng.step()
    want = _reference_sgd(ref, [x])
    assert len(seen) == 1
    got = _weights(eng)
    assert torch.allclose(got[0], ref[0] - 0.1 * 2 * seen[0], atol=1e-6)  # the doubled gradient was used
    assert torch.allclose(got[1], want[1], atol=1e-6)                       # the others untouched


def test_zero3_trace_per_step_resets_only_when_asked(ctx):
    """After the patch a forward no longer restarts ZeRO-3's trace; the returned reset does,
    and training through it stays exact (the 1F1B-style order of the stage engines)."""
    eng, ref = _unmanaged(3)
    coordinator = eng.optimizer.parameter_offload.get_param_coordinator()
    calls = []
    original = coordinator.reset_step
    coordinator.reset_step = lambda: calls.append(1) or original()
    eng(_batch(eng)).sum()  # DeepSpeed's forward hook resets at every top-level forward
    assert calls == [1]
    reset = compat.zero3_trace_per_step(eng)
    xs = [_batch(eng, 1), _batch(eng, 2)]
    reset()
    outs = [eng(x).pow(2).sum() for x in xs]
    assert calls == [1, 1]  # the explicit reset only, not the two forwards
    for out in outs:
        compat.start_stage_backward(eng)
        torch.autograd.backward(out)
    eng.step()
    got, want = _weights(eng), _reference_sgd(ref, xs)
    assert max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True)) <= 1e-6
