"""Every multi-process evaluation of tests/eval in ONE launch (2 processes):

    python _parallel_worker.py NATIVE_EXPORT TASKS_DIR OUT   (2 ranks: tests/helpers.py run_ranks)

* the vocabulary-parallel log-probabilities and argmax at TP=2 against torch on the gathered
  logits (ties planted so the lowest id must win across the two shards);
* the built-in tasks at ``tp2`` (TP=2), ``pp2`` (PP=2: the pipeline stages of training,
  activations sent stage to stage) and ``dp2`` (two replicas splitting the batches), each
  written as OUT/NAME.json by rank 0 with per-example values;
* greedy generation through the lm-eval adapter at PP=2 (``gen_pp2.json``), when lm-eval is
  installed.

A failing rank writes OUT/error_rank{R}.txt.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

GEN_CONTEXTS = ["The quick brown", "Sleeps near", "Music science"]


def check_vocab_parallel(ctx, out: Path) -> None:
    import torch.distributed as dist

    from gpt_dist.inference.vocab import vocab_parallel_argmax, vocab_parallel_logprobs

    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 5, 16, generator=g)
    full[0, 0, 3] = full[0, 0, 11] = full[0, 0].max() + 1.0     # a tie across the two shards
    full[1, 2, 9] = full[1, 2, 12] = full[1, 2].max() + 1.0     # a tie inside shard 1
    targets = torch.randint(0, 16, (3, 5), generator=g)
    mine = full[..., ctx.tp_rank * 8:(ctx.tp_rank + 1) * 8].contiguous()
    top = vocab_parallel_argmax(mine, ctx.tensor_parallel)
    lp = vocab_parallel_logprobs(mine.clone(), targets)
    want_lp = torch.log_softmax(full, -1).gather(-1, targets[..., None])[..., 0]
    ok = bool((top == full.argmax(-1)).all()) and bool(torch.allclose(lp, want_lp, atol=1e-6))
    if dist.get_rank() == 0:
        (out / "vocab_tp2.json").write_text(json.dumps({"ok": ok, "top": top.tolist(),
                                                        "want": full.argmax(-1).tolist()}))


def generate_pp2(em, rank: int, out: Path) -> None:
    """Greedy generation through the lm-eval adapter at PP=2 (when lm-eval is installed)."""
    try:
        from gpt_dist.eval.harness import make_lm
        lm = make_lm(em, 8, progress=False)
    except Exception:  # noqa: BLE001 - lm-eval absent: ImportError or EvalError
        return
    gen = [lm._generate(c, {"until": ["."], "max_gen_toks": 6}) for c in GEN_CONTEXTS]
    if rank == 0:
        (out / "gen_pp2.json").write_text(json.dumps(gen))


def main() -> None:
    native, tasks, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    from gpt_dist import deepspeed_compat

    # the process group outlives the three layouts; each layout's context creates and
    # destroys its own model-parallel groups (two contexts of different sizes never coexist)
    deepspeed_compat.skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    try:
        from gpt_dist.eval import tasks as T
        from gpt_dist.eval.driver import evaluate_model, parse_args
        from gpt_dist.eval.model import load_eval_model
        from gpt_dist.inference import open_context

        args = parse_args(["--model", str(native), "--tasks", "lambada,wikitext,hellaswag",
                           "--data-dir", str(tasks), "--no-progress", "--bootstrap-iters", "1000"])
        loaded = [T.read(t) for t in T.resolve(args.tasks, args.data_dir)]
        for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2), ("dp2", 1, 1)):
            with open_context(tp, pp, "cpu") as ctx:
                assert (ctx.tp, ctx.pp, ctx.dp) == (tp, pp, 2 // (tp * pp)), (ctx.tp, ctx.pp, ctx.dp)
                if name == "tp2":
                    check_vocab_parallel(ctx, out)
                em = load_eval_model(native, ctx)
                res = evaluate_model(em, loaded, args)
                if rank == 0:
                    (out / f"{name}.json").write_text(json.dumps(res, default=str))
                if name == "pp2":
                    generate_pp2(em, rank, out)
                del em
        if rank == 0:
            (out / "done").write_text("ok")
    except BaseException:
        (out / f"error_rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    from tests import helpers

    helpers.run_ranks(lambda rank: main(), 2, timeout=560)
