"""Runs lm-evaluation-harness offline twice on the same local tasks, in one process (lm-eval's
imports are the slow part): its own ``hf`` backend on the Hugging Face export, then the
project's adapter (``gpt_dist.eval.harness``) on the native export of the same weights.

The ``hf`` backend runs with ``logits_cache=False``: with it on (lm-eval 0.4.13's default),
requests of different tasks that share ``context + continuation[:-1]`` but differ in
continuation length share one logits slice, and the shorter one's log-probabilities are
gathered from the leading instead of the trailing positions (its greedy flag uses the
trailing ones, PR #2987). Seen here: lambada_openai-style perplexity 227.9 with the cache,
112.8 without it or when the task runs alone, which is what every per-example check gives.

    python _lmeval_worker.py HF_EXPORT NATIVE_EXPORT TASKS_DIR OUT.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[k] = "1"
os.environ["DISABLE_MULTIPROC"] = "1"  # bootstrap in-process (same draws as the pool)

YAMLS = {
    "gd_lambada": """task: gd_lambada
dataset_path: json
dataset_name: null
dataset_kwargs: {{data_files: {{test: {d}/lambada.jsonl}}}}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - {{metric: perplexity, aggregation: perplexity, higher_is_better: false}}
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
""",
    "gd_wikitext": """task: gd_wikitext
dataset_path: json
dataset_name: null
dataset_kwargs: {{data_files: {{test: {d}/wikitext.jsonl}}}}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: !function gd_utils.wikitext_detokenizer
process_results: !function gd_utils.process_results
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "gd_mc": """task: gd_mc
dataset_path: json
dataset_name: null
dataset_kwargs: {{data_files: {{test: {d}/hellaswag.jsonl}}}}
output_type: multiple_choice
test_split: test
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
""",
    "gd_gen": """task: gd_gen
dataset_path: json
dataset_name: null
dataset_kwargs: {{data_files: {{test: {d}/gen.jsonl}}}}
output_type: generate_until
test_split: test
doc_to_text: context
doc_to_target: target
generation_kwargs: {{until: ["."], max_gen_toks: 6, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
""",
}
UTILS = "from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa\n"


def main() -> None:
    hf, native, tasks_dir, out = (Path(a) for a in sys.argv[1:5])
    inc = out.parent / "lmeval_tasks"
    inc.mkdir(parents=True, exist_ok=True)
    for name, text in YAMLS.items():
        (inc / f"{name}.yaml").write_text(text.format(d=tasks_dir.resolve()))
    (inc / "gd_utils.py").write_text(UTILS)
    os.environ["HF_HOME"] = str(out.parent / "hf_home")
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = list(YAMLS)
    res = {}
    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf},dtype=float32,logits_cache=False", tasks=names,
                                  task_manager=TaskManager(include_path=str(inc)), device="cpu", batch_size=8,
                                  bootstrap_iters=1000, log_samples=True)
    res["hf"] = {"results": ref["results"],
                 "gen": [s["filtered_resps"][0] for s in sorted(ref["samples"]["gd_gen"], key=lambda s: s["doc_id"])]}

    from gpt_dist.eval.harness import make_lm
    from gpt_dist.eval.model import load_eval_model
    from gpt_dist.inference import open_context

    with open_context(1, 1, "cpu") as ctx:
        em = load_eval_model(native, ctx)
        mine = lm_eval.simple_evaluate(model=make_lm(em, 8, progress=False), tasks=names,
                                       task_manager=TaskManager(include_path=str(inc)), bootstrap_iters=1000,
                                       log_samples=True)
    res["gpt_dist"] = {"results": mine["results"],
                       "gen": [s["filtered_resps"][0] for s in sorted(mine["samples"]["gd_gen"],
                                                                      key=lambda s: s["doc_id"])]}
    out.write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
