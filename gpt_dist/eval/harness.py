"""An lm-evaluation-harness model backed by the project's parallel model (``--harness lm-eval``).

``GptDistLM`` subclasses lm-eval's ``TemplateLM``, so lm-eval itself does the request
tokenization (``_encode_pair``, the empty-context prefix token) exactly as for its ``hf``
backend; the token-level work goes to the same ``Scorer`` the built-in tasks use:

* ``_loglikelihood_tokens`` -> ``Scorer.loglikelihood`` (sorted batches, left truncation, shared
  contexts through the KV cache, vocabulary-parallel log-probabilities, TP/PP/DP);
* ``loglikelihood_rolling`` -> ``Scorer.loglikelihood_rolling`` (lm-eval's disjoint windows);
* ``generate_until``: greedy decoding with the KV cache (the context left-truncated to
  ``max_length - max_gen_toks`` as lm-eval's ``hf`` does), stopping at the end-of-document
  token, ``max_gen_toks`` or the first stop string; the text is decoded together with the
  prompt (``gpt_dist.inference.generate.continuation_text``). Sampling is refused (one line).

Every rank runs the whole of lm-eval's evaluation (``rank`` 0 and ``world_size`` 1 towards
lm-eval: the layout is inside the model, lm-eval must not shard the documents); rank 0
prints and writes. Nothing is downloaded: tasks come from ``--include-path`` YAMLs whose
``dataset_path: json`` reads local files (``LMEVAL_OFFLINE`` below is set before lm-eval loads).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from gpt_dist.config import EvalConfig
from gpt_dist.eval.model import EvalError, load_eval_model
from gpt_dist.eval.results import write_json
from gpt_dist.eval.scoring import Scorer
from gpt_dist.inference import Fill, Score, open_context
from gpt_dist.inference.generate import continuation_text

LMEVAL_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _template_lm() -> type:
    try:
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise EvalError("--harness lm-eval: lm-evaluation-harness is not installed "
                        "(pip install -e '.[eval]')") from None
    return TemplateLM


def make_lm(em: Any, batch_size: int = 8, reuse_context: bool = True, progress: bool = True) -> Any:
    """An lm-eval ``LM`` over ``em`` (an ``EvalModel``)."""
    TemplateLM = _template_lm()

    class GptDistLM(TemplateLM):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.em = em
            self.scorer = Scorer(em, batch_size, reuse_context=reuse_context, progress=progress)
            self._key = -1

        @property
        def eot_token_id(self) -> int:
            return em.prefix_id

        @property
        def max_length(self) -> int:
            return em.max_length

        @property
        def tokenizer_name(self) -> str:
            return f"gpt_dist-{getattr(em.tokenizer, 'kind', 'tokenizer')}"

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            return list(em.tokenizer.encode(string))

        def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any
                                  ) -> list[tuple[float, bool]]:
            res = self.scorer.loglikelihood([(list(c), list(k)) for _, c, k in requests], desc="loglikelihood")
            for (key, _, _), r in zip(requests, res, strict=True):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, r)
            return res

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            strings = [req.args[0] for req in requests]
            lls = self.scorer.loglikelihood_rolling([self.tok_encode(s) for s in strings])
            for s, ll in zip(strings, lls, strict=True):
                self.cache_hook.add_partial("loglikelihood_rolling", (s,), ll)
            return lls

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            return [self._generate(*req.args[:2]) for req in requests]

        def _generate(self, context: str, gen_kwargs: dict[str, Any]) -> str:
            kw = dict(gen_kwargs or {})
            if kw.get("do_sample") or float(kw.get("temperature", 0.0) or 0.0) > 0.0:
                raise EvalError("--harness lm-eval: generate_until with sampling is not supported (greedy only)")
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            # (lm-eval adds the decoded EOS to the stop strings: generation stops at its id here)
            max_gen = int(kw.get("max_gen_toks", kw.get("max_new_tokens", 256)))
            if max_gen >= self.max_length:
                raise EvalError(f"--harness lm-eval: max_gen_toks {max_gen} must be below the context {self.max_length}")
            ids = self.tok_encode(context)[-(self.max_length - max_gen):] or [self.eot_token_id]
            self._key -= 1
            key, runner = self._key, self.scorer.runner
            if len(ids) > 1:
                runner.run([Fill(torch.tensor([ids[:-1]]), key)])
            else:
                runner.new_cache(key)
            last, out = ids[-1], []
            try:
                for _ in range(max_gen):
                    ((_, top),) = runner.run([Score(torch.tensor([[last]]), torch.zeros(1, 1, dtype=torch.long),
                                                    cache=key, grow=True)])
                    last = int(top[0, -1])
                    if last == self.eot_token_id:
                        break
                    out.append(last)
                    if until and any(u and u in continuation_text(em.tokenizer, ids, out) for u in until):
                        break
            finally:
                runner.caches.pop(key, None)
            text = continuation_text(em.tokenizer, ids, out)
            for u in until:
                if u:
                    text = text.split(u)[0]
            return text

    return GptDistLM()


def run_harness(args: EvalConfig) -> int:
    """``launch/evaluate.py --harness lm-eval``: lm-eval's ``simple_evaluate`` on our model."""
    for k, v in LMEVAL_OFFLINE.items():
        os.environ.setdefault(k, v)
    _template_lm()
    import lm_eval
    from lm_eval.tasks import TaskManager

    with open_context(args.tp, args.pp, args.device) as ctx:
        em = load_eval_model(args.model, ctx, args.tokenizer, args.dtype)
        lm = make_lm(em, args.batch_size, args.reuse_context, progress=args.progress)
        manager = TaskManager(include_path=args.include_path) if args.include_path else TaskManager()
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise EvalError(f"--tasks: lm-eval knows no task {unknown[0]!r} (add its YAML under --include-path)")
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=args.limit,
                                      bootstrap_iters=args.bootstrap_iters, log_samples=False)
        if ctx.rank == 0 and out is not None:
            from lm_eval.utils import make_table

            print(make_table(out))
            if args.out:
                write_json(args.out, {"format": "gpt_dist-eval-lm-eval", "model": {**em.source, "fingerprint":
                                      em.fingerprint}, "results": out.get("results"),
                                      "n-samples": out.get("n-samples"), "configs": out.get("configs")})
                print(f"results: {args.out}")
    return 0
