#!/usr/bin/env python
"""Zero-shot evaluation throughput: gpt_dist's built-in tasks (``launch/evaluate.py``'s code
path) vs lm-evaluation-harness's ``hf`` backend, in one run, on the same export (the HF export
of one random-weight GPT-2), the same local task files (LAMBADA-style, rolling perplexity,
4-choice multiple choice of HellaSwag's shape: contexts of 30-60 words, endings of 10-25; all
built from the sample corpus, real English), the same threads and batch size.

    python bench/eval_bench.py [--n-layer 4 --n-embd 256 --n-ctx 256 --batch 8 --threads N]

Each task is timed alone for each contender (best of --repeats, interleaved), from the task
file to the metrics, with the model loaded beforehand (lm-eval: ``simple_evaluate`` of that one
task on an ``HFLM`` built once, after a warm-up that built its dataset cache; gpt_dist: reading
and checking the file, tokenization, scoring and metrics). lm-eval runs with its defaults
(``logits_cache`` on). Perplexity bootstraps are off on both sides (``bootstrap_iters=0``):
they measure the statistics, not the model. Prints examples/s per task and overall and appends
them to BENCHMARKS.md with the machine (targets, issue 13: >= 1.5x overall, >= 2x on multiple
choice).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_k] = "1"

YAML = {
    "lambada": """task: bench_lambada
dataset_path: json
dataset_kwargs: {{data_files: {{test: {d}/lambada.jsonl}}}}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - {{metric: perplexity, aggregation: perplexity, higher_is_better: false}}
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
""",
    "ptb": """task: bench_ptb
dataset_path: json
dataset_kwargs: {{data_files: {{test: {d}/ptb.jsonl}}}}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - {{metric: word_perplexity}}
  - {{metric: byte_perplexity}}
  - {{metric: bits_per_byte}}
""",
    "hellaswag": """task: bench_hellaswag
dataset_path: json
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
}


def build_tasks(docs: list[str], out: Path, n_lambada: int, n_rolling: int, n_mc: int) -> None:
    import random

    rs = random.Random(0)
    words = [w for d in docs for w in d.split()]
    out.mkdir(parents=True, exist_ok=True)

    def span(n: int) -> str:
        i = rs.randrange(len(words) - n)
        return " ".join(words[i: i + n])

    with open(out / "lambada.jsonl", "w") as f:
        f.writelines(json.dumps({"text": span(rs.randint(40, 90))}) + "\n" for _ in range(n_lambada))
    with open(out / "ptb.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d[:6000]}) + "\n" for d in sorted(docs, key=len, reverse=True)[:n_rolling])
    # HellaSwag's shape: a context of two sentences or so, four endings of one sentence each
    mc = [{"context": span(rs.randint(30, 60)), "choices": [span(rs.randint(10, 25)) for _ in range(4)],
           "label": rs.randrange(4)} for _ in range(n_mc)]
    (out / "hellaswag.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--lambada", type=int, default=200)
    ap.add_argument("--rolling", type=int, default=20)
    ap.add_argument("--mc", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from _machine import cpu_name  # bench/ is on sys.path when a bench script runs

    from gpt_dist.config import ModelConfig
    from gpt_dist.data.sample_corpus import iter_documents
    from gpt_dist.eval import tasks as T
    from gpt_dist.eval.driver import evaluate_model, parse_args
    from gpt_dist.eval.model import load_eval_model
    from gpt_dist.export import expected_shapes, export_state
    from gpt_dist.inference import open_context
    from gpt_dist.tokenizer import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="eval_bench_"))
    docs = [d["text"] for _, d in zip(range(400), iter_documents(max_doc_chars=8000), strict=False)]
    (work / "corpus.txt").write_text("\n".join(docs))
    tok = train_tokenizer([work / "corpus.txt"], args.vocab, work / "tok", num_threads=args.threads)
    cfg = ModelConfig(arch="gpt2", n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, n_ctx=args.n_ctx,
                      vocab_size=tok.vocab_size, dropout=0.0, attn_dropout=0.0)
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.ones(s) if "ln_" in k and k.endswith("weight")
                 else torch.randn(s, generator=g) * 0.02) for k, s in expected_shapes(cfg).items()}
    hf = export_state(state, cfg, work / "export_hf", fmt="hf", tokenizer_dir=work / "tok")
    data = work / "tasks"
    build_tasks(docs, data, args.lambada, args.rolling, args.mc)
    inc = work / "yaml"
    inc.mkdir()
    for name, text in YAML.items():
        (inc / f"bench_{name}.yaml").write_text(text.format(d=data))
    os.environ["HF_HOME"] = str(work / "hf_home")

    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(inc))
    ctx = open_context(1, 1, "cpu")
    em = load_eval_model(hf, ctx)
    counts = {"lambada": args.lambada, "ptb": args.rolling, "hellaswag": args.mc}

    def ours(name: str) -> float:
        a = parse_args(["--model", str(hf), "--tasks", name, "--data-dir", str(data),
                        "--batch-size", str(args.batch), "--bootstrap-iters", "0", "--no-progress"])
        t0 = time.perf_counter()
        evaluate_model(em, [T.read(t) for t in T.resolve(a.tasks, a.data_dir)], a)
        return time.perf_counter() - t0

    from lm_eval.models.huggingface import HFLM

    hflm = HFLM(pretrained=str(hf), dtype="float32", device="cpu", batch_size=args.batch)  # loaded once, untimed

    def theirs(name: str, limit: int | None = None) -> float:
        t0 = time.perf_counter()
        lm_eval.simple_evaluate(model=hflm, tasks=[f"bench_{name}"], task_manager=manager, bootstrap_iters=0,
                                limit=limit, verbosity="ERROR")
        return time.perf_counter() - t0

    for name in counts:  # warm-up: datasets' Arrow cache, lazy imports, the hf model load path
        theirs(name, limit=2)
        ours(name)
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.repeats):
        for name in counts:
            for who, fn in (("gpt_dist", ours), ("lm-eval hf", theirs)):
                s = fn(name)
                best[(who, name)] = min(best.get((who, name), float("inf")), s)
    rows = ["| task | examples | gpt_dist s | gpt_dist ex/s | lm-eval hf s | lm-eval ex/s | ratio |", "|---|---|---|---|---|---|---|"]
    tot_o = tot_t = 0.0
    for name, n in counts.items():
        o, t = best[("gpt_dist", name)], best[("lm-eval hf", name)]
        tot_o, tot_t = tot_o + o, tot_t + t
        rows.append(f"| {name} | {n} | {o:.2f} | {n / o:.1f} | {t:.2f} | {n / t:.1f} | **{t / o:.2f}x** |")
    n_all = sum(counts.values())
    rows.append(f"| all | {n_all} | {tot_o:.2f} | {n_all / tot_o:.1f} | {tot_t:.2f} | {n_all / tot_t:.1f} | "
                f"**{tot_t / tot_o:.2f}x** |")
    machine = f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} thread(s), torch {torch.__version__}, " \
              f"lm_eval {lm_eval.__version__}"
    shape = (f"GPT-2 {args.n_layer} layers, {args.n_embd} wide, {args.n_head} heads, context {args.n_ctx}, "
             f"vocab {tok.vocab_size}; fp32; batch {args.batch}; best of {args.repeats}")
    text = "\n".join(rows)
    print(machine + "\n" + shape + "\n" + text)
    if not args.no_append:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with open(ROOT / "BENCHMARKS.md", "a") as f:
            f.write(f"\n## Zero-shot evaluation (bench/eval_bench.py, {stamp})\n\n"
                    f"Machine: {machine}. {shape}. Each task alone per contender, interleaved; lm-eval with its "
                    f"defaults (logits cache on), bootstraps off on both sides.\n\n{text}\n")


if __name__ == "__main__":
    main()
