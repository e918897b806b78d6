"""Every multi-process fine-tuning run of tests/finetune in ONE launch (process start-up and
the DeepSpeed import cost ~15 s per launch on 2 cores; each tiny run takes seconds).

    python tests/finetune/_ft_worker.py OUT TASKS_DIR TOKENIZER_DIR PORT

The parent imports the trainer once and forks 2 processes; they go through two worlds:

A. world 2: the same multiple-choice fine-tuning (dropout 0 unless said) as
   ``tp2`` (tp=2), ``pp2`` (pp=2, ZeRO-1), ``dp2_zero0`` and ``dp2_zero3`` (ZeRO-3 with every
   parameter partitioned, tests/helpers.py ``zero3``), and with dropout 0.1 ``dp2_drop``
   (uninterrupted) and ``dp2_drop_resumed`` (2 epochs; a stop signal after step 6, mid-epoch,
   then the same run started again: it resumes from the checkpoint the signal wrote).
B. world 1 (rank 0): the references ``tp1`` (pp=1, the same batches) and, per task type, a
   run that must learn: ``learn_{task}`` (classification, entailment, similarity classes and
   scores, multiple choice; lambda 0.5) and ``learn_classification_lm0`` (lambda 0);
   ``grown`` starts from a native export whose vocabulary lacks the last 3 ids.

Every run is the real fine-tuning entry (``gpt_dist.finetune.session.finetune`` with the context
passed in), writing RUN/metrics.jsonl and RUN/results.json, which the tests compare. A
failing rank writes ``error_rank{R}_{phase}.txt``.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

TASK_FILES = {"classification": "cls", "entailment": "ent", "similarity": "sim", "similarity_score": "simreg",
              "multiple_choice": "mc"}


def base(out: Path, tasks: Path, tok: str, name: str, task: str = "multiple_choice", **finetune) -> dict:
    key = TASK_FILES[task]
    ft_task = "similarity" if task == "similarity_score" else task
    ft = {"task": ft_task, "train_file": str(tasks / f"{key}_train.jsonl"),
          "valid_file": str(tasks / f"{key}_valid.jsonl"), "epochs": 1, "lm_coef": 0.5,
          "classifier_dropout": 0.0, "max_len": 48, "warmup_fraction": 0.1}
    if ft_task in ("classification", "entailment", "similarity") and task != "similarity_score":
        ft["label_names"] = {"classification": ["cat", "dog", "fox"], "entailment": ["no", "yes"],
                             "similarity": ["diff", "same"]}[ft_task]
    if task == "similarity_score":
        ft["regression"] = True
    ft.update(finetune)
    return {
        "run": {"name": name, "dir": str(out / name)},
        "model": {"arch": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_ctx": 48, "vocab_size": 320,
                  "make_vocab_size_divisible_by": 4, "dropout": 0.0, "attn_dropout": 0.0},
        "parallel": {"tp": 1, "pp": 1},
        # 1e-3: training stays smooth (gradient norm ~1), so layouts differ by rounding only
        "optimizer": {"lr": 1e-3, "weight_decay": 0.01},
        "data": {"tokenizer": tok},
        "training": {"micro_batch_size": 2, "global_batch_size": 8, "precision": "fp32", "device": "cpu",
                     "deterministic": True, "seed": 7},
        "checkpoint": {"save_interval": 1000, "keep_last": 2},
        "logging": {"log_interval": 1000, "progress_bar": False, "tensorboard": False},
        "deepspeed": {"zero_optimization": {"stage": 0, "reduce_bucket_size": 200_000,
                                            "allgather_bucket_size": 200_000}},
        "finetune": ft,
    }


def _init(rank: int, world: int, port: int, tp: int = 1, pp: int = 1):
    from gpt_dist.config import ParallelConfig
    from gpt_dist.parallel import ParallelContext

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return ParallelContext.from_env(ParallelConfig(tp=tp, pp=pp), device="cpu", timeout_s=240)


def _next_port(ctx) -> int:
    from tests import helpers

    return helpers.teardown_world(ctx)


class StopAt:
    """Hooks: ask every rank to save and stop before step ``at`` (as SIGUSR1 would)."""

    def __new__(cls, at: int):
        from gpt_dist.training.hooks import TrainHooks

        class _Stop(TrainHooks):
            def on_step_start(self, step, ctx, stop):
                if step == at:
                    stop.signum = 10

        return _Stop()


def _run(ctx, raw: dict, hooks=None) -> None:
    from gpt_dist.config import config_from_dict
    from gpt_dist.finetune.session import finetune
    from tests.faults import Zero3Report

    if raw["deepspeed"]["zero_optimization"].get("stage") == 3 and hooks is None:
        hooks = Zero3Report()
    finetune(config_from_dict(raw), ctx, hooks)


def _learn(raw: dict) -> dict:
    raw["optimizer"]["lr"] = 3e-3  # the learning runs: as fast as the toy tasks allow
    return raw


def _guard(out: Path, rank: int, phase: str, fn) -> bool:
    try:
        fn()
        return True
    except BaseException:  # noqa: BLE001 - report anything, never hang the peers
        (out / f"error_rank{rank}_{phase}.txt").write_text(traceback.format_exc())
        return False


def worker(rank: int, out: str, tasks: str, tok: str, port: int) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", GPT_DIST_PG_TIMEOUT="240")
    torch.set_num_threads(1)
    outp, tasksp = Path(out), Path(tasks)
    import gpt_dist.training.metrics as M

    M.plot_loss = lambda run_dir: None  # matplotlib costs seconds per run, not tested here
    from tests import helpers

    ports = [port]

    def phase_a() -> None:
        ctx = _init(rank, 2, ports[0], tp=2)
        _run(ctx, {**base(outp, tasksp, tok, "tp2"), "parallel": {"tp": 2, "pp": 1}})
        ports.append(_next_port(ctx))
        ctx = _init(rank, 2, ports[-1], pp=2)
        raw = base(outp, tasksp, tok, "pp2")
        raw["parallel"] = {"tp": 1, "pp": 2}
        raw["deepspeed"]["zero_optimization"]["stage"] = 1
        _run(ctx, raw)
        ports.append(_next_port(ctx))
        ctx = _init(rank, 2, ports[-1])
        _run(ctx, base(outp, tasksp, tok, "dp2_zero0"))
        raw = base(outp, tasksp, tok, "dp2_zero3")
        raw["deepspeed"]["zero_optimization"].update(helpers.zero3())
        _run(ctx, raw)
        drop = {"dropout": 0.1, "attn_dropout": 0.1}
        for name in ("dp2_drop", "dp2_drop_resumed"):
            raw = base(outp, tasksp, tok, name, classifier_dropout=0.1, epochs=2)
            raw["model"].update(drop)
            if name.endswith("resumed"):
                _run(ctx, raw, StopAt(7))      # saves after step 6 (mid-epoch: 24 steps/epoch)
                (outp / name / "first_stop.txt").write_text("stopped\n")
            _run(ctx, raw)
        ports.append(_next_port(ctx))

    if not _guard(outp, rank, "A", phase_a) or rank >= 1:
        return

    def phase_b() -> None:
        ctx = _init(0, 1, ports[-1])
        _run(ctx, base(outp, tasksp, tok, "tp1"))
        for task in TASK_FILES:  # entailment (a word after the delimiter) needs more steps
            epochs = 10 if task == "entailment" else 6
            _run(ctx, _learn(base(outp, tasksp, tok, f"learn_{task}", task, epochs=epochs)))
        _run(ctx, _learn(base(outp, tasksp, tok, "learn_classification_lm0", "classification", lm_coef=0.0,
                              epochs=6)))
        raw = base(outp, tasksp, tok, "grown")
        raw["checkpoint"]["init_from"] = str(tasksp / "small_vocab_export")
        _run(ctx, raw)
        _next_port(ctx)

    if _guard(outp, rank, "B", phase_b):
        (outp / "done").write_text("ok\n")


if __name__ == "__main__":
    import torch.multiprocessing as mp

    out_dir, tasks_dir, tok_dir, first_port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    os.makedirs(out_dir, exist_ok=True)
    os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import deepspeed  # noqa: F401 - imported once in the parent, then forked

    import gpt_dist.finetune.session  # noqa: F401

    ctx_mp = mp.get_context("fork")
    procs = [ctx_mp.Process(target=worker, args=(r, out_dir, tasks_dir, tok_dir, first_port)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    sys.exit(max(abs(p.exitcode or 0) for p in procs))
