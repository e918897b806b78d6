"""Every TP=2 kernel measurement in ONE launch: two forked ranks, tp=2, gloo, Triton's interpreter.

    python tests/kernels/_tp2_worker.py OUT DATA_PREFIX

* ``fwdbwd_{arch}_{on|off}.pt``: one forward + backward of the TP=2 model, dropout 0.1 (the
  per-TP-rank region for the split attention heads and, with sequence parallelism (gpt2),
  for the split residual stream), every gradient gathered into the full tensor;
* ``ce.pt``: the streamed vocabulary-parallel CE vs megatron-core's at TP=2 (rank 1's shard
  ends in padding columns);
* pretraining runs, tp=2, dropout 0.1, ZeRO-1, 4 steps: ``off/`` (reference); ``on_ac/``
  (every Triton kernel + FusedAdam, activation checkpointing: the recomputed dropout masks
  must be the forward's); ``on_then_off/`` (kernels on for 2 steps, then resumed from that
  checkpoint with kernels off) and ``off_then_on/`` (the reverse). The second start's log is
  RUN/second_start.log;
* then a world of pp=2 under ZeRO-3 (a DeepSpeed engine per stage): ``pp2z3_off/`` and
  ``pp2z3_on/`` (every kernel on), 4 steps each.

The ranks are started by tests/helpers.py ``run_ranks``; a failing rank fails the launch
with its rank and traceback.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from tests import helpers
from tests.helpers import VOCAB

ON = {"layernorm": "on", "bias_gelu": "on", "bias_dropout_add": "on", "cross_entropy": "on",
      "fused_adam": "on", "ce_chunk_tokens": 9}
OFF = {k: "off" for k in ON if k != "ce_chunk_tokens"}
#: what these runs change in configs/tiny_cpu.json (tests/helpers.py ``toy_config``)
TOY: dict = {
    "run": {"name": "k"},
    "model": {"n_layer": 2, "n_embd": 32, "n_ctx": 16, "vocab_size": VOCAB},
    "parallel": {"tp": 2},
    "schedule": {"warmup_steps": 1, "decay_steps": 4},
    "data": {"seq_len": 16, "split": "90,10,0"},
    "training": {"micro_batch_size": 2, "global_batch_size": 4, "eval_interval": 4, "eval_steps": 1,
                 "seed": 1234},
    "checkpoint": {"save_interval": 1000, "keep_last": 1},
    "logging": {"log_interval": 1000, "tensorboard": False},
    "deepspeed": {"zero_optimization": {"reduce_bucket_size": 200_000, "allgather_bucket_size": 200_000}},
}


def _config(out: Path, data: str, name: str, kernels: dict, steps: int = 4, ac: bool = False,
            parallel: dict | None = None, zero: dict | None = None):
    ac_section = {"activation_checkpointing": "full"} if ac else {}
    return helpers.toy_config(out / name, [data], **{
        **TOY, "training": {**TOY["training"], "train_steps": steps}, "kernels": kernels,
        "parallel": parallel or {**TOY["parallel"], **ac_section},
        "deepspeed": {"zero_optimization": {**TOY["deepspeed"]["zero_optimization"], **(zero or {})}}})


def _forward_backward(ctx, arch: str, kernels) -> dict:
    import torch.distributed as dist

    from gpt_dist import rng
    from gpt_dist.config import ModelConfig
    from gpt_dist.model.build import build_gpt as build_model

    mcfg = ModelConfig(arch=arch, n_layer=2, n_head=4, n_embd=32, n_ctx=16, vocab_size=VOCAB,
                       dropout=0.1, attn_dropout=0.1)
    sp = arch == "gpt2"
    rng.seed_all(5, tp_rank=ctx.tp_rank)
    model = build_model(mcfg, ctx.tensor_parallel, sequence_parallel=sp, seed=99, kernels=kernels).train()
    g = torch.Generator().manual_seed(11)  # the same batch on both ranks
    ids = torch.randint(0, VOCAB, (3, 16), generator=g)
    labels = torch.randint(0, VOCAB, (3, 16), generator=g)
    mask = (torch.rand(3, 16, generator=g) > 0.2).float()
    loss = model(ids, labels, mask)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.detach().clone()
        if getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(grad) for _ in range(2)]
            dist.all_gather(parts, grad.contiguous(), group=ctx.tp_group)
            grad = torch.cat(parts, dim=p.partition_dim)
        grads[name] = grad
    model.eval()
    with torch.no_grad():
        eval_loss = model(ids, labels, mask)
    return {"loss": float(loss.item()), "grads": grads, "eval_loss": float(eval_loss.item())}


def _ce(ctx) -> dict:
    """logits [5, 2, 256/rank] of a 500-word vocabulary padded to 512: rank 1's last 12
    columns are padding (masked as mask_padded_vocab does for the reference)."""
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    from gpt_dist.kernels.cross_entropy import vocab_parallel_cross_entropy
    from gpt_dist.model.lm_head import mask_padded_vocab

    g = torch.Generator().manual_seed(3)
    full = torch.randn(5, 2, 512, generator=g) * 3
    target = torch.randint(0, VOCAB, (5, 2), generator=g)
    dy = torch.randn(5, 2, generator=g)
    local = full[..., ctx.tp_rank * 256:(ctx.tp_rank + 1) * 256].clone().requires_grad_(True)
    # a copy: megatron-core's CE shifts its (float32) input in place, and without padding on
    # this rank mask_padded_vocab returns the same tensor
    masked = mask_padded_vocab(local.clone(), VOCAB, 512, ctx.tensor_parallel)
    ref = tensor_parallel.vocab_parallel_cross_entropy(masked.float(), target)
    (ref_g,) = torch.autograd.grad(ref, local, dy)
    got = vocab_parallel_cross_entropy(local, target, VOCAB, block_v=64, tp=ctx.tensor_parallel)
    (got_g,) = torch.autograd.grad(got, local, dy)
    grads = [torch.empty_like(got_g) for _ in range(2)], [torch.empty_like(ref_g) for _ in range(2)]
    dist.all_gather(grads[0], got_g, group=ctx.tp_group)
    dist.all_gather(grads[1], ref_g, group=ctx.tp_group)
    return {"loss": got.detach(), "ref": ref.detach(), "grad": torch.cat(grads[0], -1),
            "ref_grad": torch.cat(grads[1], -1)}


def _pretrain(ctx, out: Path, data: str, name: str, first: dict, second: dict | None = None,
              ac: bool = False) -> None:
    import gpt_dist.training.pretrain as L

    if second is None:
        L.pretrain(_config(out, data, name, first, ac=ac), ctx)
        return
    L.pretrain(_config(out, data, name, first, steps=2), ctx)
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        L.pretrain(_config(out, data, name, second, steps=4), ctx)
    sys.stdout.write(captured.getvalue())
    if ctx.rank == 0:
        (out / name / "second_start.log").write_text(captured.getvalue())


def worker(rank: int, out: str, data: str) -> None:
    os.environ["GPT_DIST_PG_TIMEOUT"] = "240"
    outp = Path(out)
    import gpt_dist.training.metrics as M
    from gpt_dist.config import KernelsConfig, ParallelConfig
    from gpt_dist.parallel import ParallelContext

    M.plot_loss = lambda run_dir: None
    with ParallelContext.from_env(ParallelConfig(tp=2), device="cpu", timeout_s=240) as ctx:
        for arch in ("gpt1", "gpt2"):
            for tag, k in (("off", KernelsConfig(**OFF)), ("on", KernelsConfig(**ON))):
                res = _forward_backward(ctx, arch, k.resolve("cpu", "fp32"))
                if rank == 0:
                    torch.save(res, outp / f"fwdbwd_{arch}_{tag}.pt")
        ce = _ce(ctx)
        if rank == 0:
            torch.save(ce, outp / "ce.pt")
        _pretrain(ctx, outp, data, "off", OFF)
        _pretrain(ctx, outp, data, "on_ac", ON, ac=True)
        _pretrain(ctx, outp, data, "on_then_off", ON, OFF)
        _pretrain(ctx, outp, data, "off_then_on", OFF, ON)
        port = helpers.next_world_port(ctx)
    # the pipeline under ZeRO-3 (one DeepSpeed engine per stage, issue 20): kernels on vs off
    import gpt_dist.training.pretrain as L

    with helpers.world(rank, 2, pp=2, port=port) as ctx:
        for name, kernels in (("pp2z3_off", OFF), ("pp2z3_on", ON)):
            L.pretrain(_config(outp, data, name, kernels, parallel={"tp": 1, "pp": 2}, zero=helpers.zero3()), ctx)
    if rank == 0:
        (outp / "done").write_text("ok\n")


if __name__ == "__main__":
    out_dir, data_prefix = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import deepspeed  # noqa: F401 - imported once, then forked (see tests/training/_parallel_worker.py)
    import megatron.core.tensor_parallel  # noqa: F401

    import gpt_dist.kernels.bias_dropout_add
    import gpt_dist.training.pretrain  # noqa: F401

    helpers.run_ranks(worker, 2, out_dir, data_prefix, timeout=560)
