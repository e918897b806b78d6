"""Every multi-process fine-tuning run of tests/finetune in ONE launch (process start-up and
the DeepSpeed import cost ~15 s per launch on 2 cores; each tiny run takes seconds).

    python tests/finetune/_ft_worker.py OUT TASKS_DIR TOKENIZER_DIR

The parent imports the trainer once and starts 2 ranks (tests/helpers.py ``run_ranks``);
they go through worlds one after another, each a ``with ParallelContext`` block whose exit
destroys its groups:

A. world 2: the same multiple-choice fine-tuning (dropout 0 unless said) as
   ``tp2`` (tp=2), ``pp2`` (pp=2, ZeRO-1), ``pp2_zero3`` (pp=2 under ZeRO-3: a DeepSpeed
   engine per stage), ``dp2_zero0`` and ``dp2_zero3`` (ZeRO-3 with every
   parameter partitioned, tests/helpers.py ``zero3``), and with dropout 0.1 ``dp2_drop``
   (uninterrupted) and ``dp2_drop_resumed`` (2 epochs; a stop signal after step 6, mid-epoch,
   then the same run started again: it resumes from the checkpoint the signal wrote).
   Across layouts (``xl_*``: 2 epochs, validation every 8 steps, a checkpoint every 12): the
   references ``xl_pp2`` (pp=2, ZeRO-1) and ``xl_dp2z3`` (ZeRO-3) run uninterrupted; the
   resumed ``xl_pp2_to_dp2z2`` (dp=2, ZeRO-2) starts in a new run directory holding only
   ``xl_pp2``'s step-12 checkpoint (mid-epoch, with a best record from step 8).
B. world 1 (rank 0): the references ``tp1`` (pp=1, the same batches) and, per task type, a
   run that must learn: ``learn_{task}`` (classification, entailment, similarity classes and
   scores, multiple choice; lambda 0.5) and ``learn_classification_lm0`` (lambda 0);
   ``grown`` starts from a native export whose vocabulary lacks the last 3 ids;
   ``xl_dp2z3_to_1`` (one rank, ZeRO-0) resumes ``xl_dp2z3``'s step-12 checkpoint and
   ``xl_pp2_at40_to_1`` ``xl_pp2``'s step-40 one (its best, not beaten at step 48).

Every run is the real fine-tuning entry (``gpt_dist.finetune.session.finetune`` with the context
passed in), writing RUN/metrics.jsonl and RUN/results.json, which the tests compare. A
failing rank fails the launch with its rank and traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests import helpers

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
    # configs/tiny_cpu.json with what these runs change (the pretraining keys too, so every
    # resolved value is what it was before the toy config existed)
    return helpers.toy_config_dict(
        out / name, [], tokenizer=tok,
        run={"name": name},
        model={"n_layer": 2, "n_head": 2, "n_embd": 32, "n_ctx": 48, "vocab_size": 320,
               "make_vocab_size_divisible_by": 4, "dropout": 0.0, "attn_dropout": 0.0},
        # 1e-3: training stays smooth (gradient norm ~1), so layouts differ by rounding only
        optimizer={"lr": 1e-3},
        schedule={"warmup_steps": 2000},
        data={"seq_len": 1024},
        training={"train_steps": 1000, "micro_batch_size": 2, "global_batch_size": 8, "eval_interval": 1000,
                  "eval_steps": 10, "seed": 7},
        checkpoint={"save_interval": 1000},
        logging={"log_interval": 1000, "tensorboard": False},
        deepspeed={"zero_optimization": {"stage": 0, "reduce_bucket_size": 200_000,
                                         "allgather_bucket_size": 200_000}},
        finetune=ft,
    )


TIMES: dict[str, float] = {}  # seconds per run (rank 0's), written to OUT/times_rank0.json
XL_STOP = 12  # the cross-layout runs' checkpoint: mid-epoch 1 of 2 (24 steps per epoch)


def xl_config(out: Path, tasks: Path, tok: str, name: str, *, tp: int = 1, pp: int = 1, stage: int = 0) -> dict:
    """A cross-layout run: multiple choice, 2 epochs (48 steps), dropout 0 (the classifier's
    too), lr 1e-3; validation every 8 steps, so the step-12 checkpoint holds a best record
    (step 8); a checkpoint every 12 steps, all kept until the resumed runs have copied one."""
    raw = base(out, tasks, tok, name, epochs=2, eval_interval=8)
    raw["checkpoint"].update(save_interval=XL_STOP, keep_last=20)
    raw["parallel"] = {"tp": tp, "pp": pp}
    raw["deepspeed"]["zero_optimization"].update(helpers.zero3() if stage == 3 else {"stage": stage})
    return raw


def _resumed(ctx, out: Path, tasks: Path, tok: str, name: str, source: str, at: int = XL_STOP, **layout) -> None:
    """``name``: a new run directory holding only ``source``'s step-``at`` checkpoint (and the
    run's manifest key), trained to the end in ``layout`` (as tests/training/_reshard_worker.py).
    RUN/best, exported when a best step was saved, is copied too when ``source``'s final best
    is no later than step ``at``: then it is what the run directory held at that step."""
    run, src = out / name, out / source
    if ctx.is_main:
        helpers.copy_checkpoint(src, run, f"global_step{at}")
        best = json.loads((src / "results.json").read_text()).get("best")
        if best is not None and best["step"] <= at:
            shutil.copytree(src / "best", run / "best")
    ctx.barrier()
    _run(ctx, xl_config(out, tasks, tok, name, **layout))


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
    t0 = time.monotonic()
    finetune(config_from_dict(raw), ctx, hooks)
    TIMES[raw["run"]["name"]] = round(time.monotonic() - t0, 2)


def _learn(raw: dict) -> dict:
    raw["optimizer"]["lr"] = 3e-3  # the learning runs: as fast as the toy tasks allow
    return raw


def worker(rank: int, out: str, tasks: str, tok: str) -> None:
    os.environ["GPT_DIST_PG_TIMEOUT"] = "240"
    outp, tasksp = Path(out), Path(tasks)
    import gpt_dist.training.metrics as M

    M.plot_loss = lambda run_dir: None  # matplotlib costs seconds per run, not tested here

    # ---- A: world 2
    with helpers.world(rank, 2, tp=2) as ctx:
        _run(ctx, {**base(outp, tasksp, tok, "tp2"), "parallel": {"tp": 2, "pp": 1}})
        port = helpers.next_world_port(ctx)
    with helpers.world(rank, 2, pp=2, port=port) as ctx:
        raw = base(outp, tasksp, tok, "pp2")
        raw["parallel"] = {"tp": 1, "pp": 2}
        raw["deepspeed"]["zero_optimization"]["stage"] = 1
        _run(ctx, raw)
        raw = base(outp, tasksp, tok, "pp2_zero3")  # one DeepSpeed engine per stage (training/stages.py)
        raw["parallel"] = {"tp": 1, "pp": 2}
        raw["deepspeed"]["zero_optimization"].update(helpers.zero3())
        _run(ctx, raw)
        _run(ctx, xl_config(outp, tasksp, tok, "xl_pp2", pp=2, stage=1))
        port = helpers.next_world_port(ctx)
    with helpers.world(rank, 2, port=port) as ctx:
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
        _run(ctx, xl_config(outp, tasksp, tok, "xl_dp2z3", stage=3))
        _resumed(ctx, outp, tasksp, tok, "xl_pp2_to_dp2z2", "xl_pp2", stage=2)
        port = helpers.next_world_port(ctx)
    if rank >= 1:
        return

    # ---- B: world 1
    with helpers.world(0, 1, port=port) as ctx:
        _run(ctx, base(outp, tasksp, tok, "tp1"))
        for task in TASK_FILES:  # entailment (a word after the delimiter) needs more steps
            epochs = 10 if task == "entailment" else 6
            _run(ctx, _learn(base(outp, tasksp, tok, f"learn_{task}", task, epochs=epochs)))
        _run(ctx, _learn(base(outp, tasksp, tok, "learn_classification_lm0", "classification", lm_coef=0.0,
                              epochs=6)))
        raw = base(outp, tasksp, tok, "grown")
        raw["checkpoint"]["init_from"] = str(tasksp / "small_vocab_export")
        _run(ctx, raw)
        _resumed(ctx, outp, tasksp, tok, "xl_dp2z3_to_1", "xl_dp2z3", stage=0)
        _resumed(ctx, outp, tasksp, tok, "xl_pp2_at40_to_1", "xl_pp2", at=40, stage=0)
    (outp / "times_rank0.json").write_text(json.dumps(TIMES, indent=1))
    (outp / "done").write_text("ok\n")


if __name__ == "__main__":
    out_dir, tasks_dir, tok_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    os.makedirs(out_dir, exist_ok=True)
    helpers.preload_trainer()
    helpers.run_ranks(worker, 2, out_dir, tasks_dir, tok_dir, timeout=560)
