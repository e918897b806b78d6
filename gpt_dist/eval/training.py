"""Zero-shot tasks during pretraining (``training.eval_tasks``), run by ``LMObjective.evaluate``
every ``training.eval_interval`` steps beside the validation loss, on the training model
itself (the engine's module: the plain ``GPT`` or this rank's pipeline stage, TP slice, data
parallel replicas splitting the batches), in eval mode, through the inference runtime. The
metrics are returned as ``TASK/METRIC`` (``lambada/acc``) and logged with the validation loss
(metrics.jsonl, TensorBoard ``valid/lambada/acc``).

Under ZeRO-3 the module's parameters stay partitioned: DeepSpeed's hooks gather each layer's
parameters as its forward runs, collectively over the data-parallel group, so the runtime
runs in lockstep (every replica the same passes, the less busy ones padded; see
``inference.runtime``). No rank ever holds the whole model.

Task files are read and checked when the objective is built, so a bad file stops the run
before its first step (``training.eval_tasks: FILE:LINE: reason``). Evaluation consumes no
random numbers (dropout is off), so it does not change the training trajectory or its exact
resume.
"""

from __future__ import annotations

from typing import Any

from gpt_dist.config import ConfigError, DataConfig, ModelConfig, TrainingConfig
from gpt_dist.eval import tasks as T
from gpt_dist.eval.model import EvalError, EvalModel
from gpt_dist.eval.scoring import Scorer
from gpt_dist.tokenizer import load_tokenizer


class ZeroShot:
    """The run's ``training.eval_tasks``, scored on the training model by ``run``."""

    def __init__(self, model: ModelConfig, data: DataConfig, training: TrainingConfig, zero_stage: int,
                 ctx: Any) -> None:
        """``model``: the architecture ``EvalModel`` reads the module as; ``data.tokenizer``: the
        run's tokenizer; ``zero_stage`` 3: the replicas score in lockstep (see above)."""
        t = training
        try:
            self.tasks = [T.read(task, t.eval_tasks_limit)
                          for task in T.resolve(",".join(t.eval_tasks), t.eval_tasks_dir)]
        except EvalError as exc:
            raise ConfigError(f"training.eval_tasks: {exc}") from None
        self.model, self.training, self.zero_stage, self.ctx = model, training, zero_stage, ctx
        self.tokenizer = load_tokenizer(data.tokenizer)

    def run(self, module: Any, step: int) -> dict[str, float]:
        """{TASK/METRIC: value} on ``module`` (already in eval mode)."""
        em = EvalModel(module, self.model, self.ctx, self.tokenizer, fingerprint=f"training step {step}")
        scorer = Scorer(em, batch_size=max(self.training.micro_batch_size, 1), progress=False,
                        lockstep=self.zero_stage == 3)
        out: dict[str, float] = {}
        for task in self.tasks:
            raw = T.score(task, scorer, self.tokenizer)
            for name, m in T.compute_metrics(task, raw, None, bootstrap_iters=0).items():
                out[f"{task.name}/{name}"] = float(m["value"])
        return out
