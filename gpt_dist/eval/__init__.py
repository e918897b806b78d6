"""Zero-shot evaluation (GPT-2 §3) on the project's own parallel model.

    model.py    load an export / HF directory / run directory onto this rank's TP x PP slice
    vocab.py    log p(target) and the greedy token from vocabulary-parallel logits
    runner.py   forward passes on a stage (KV cache for shared contexts, pipeline p2p)
    scoring.py  lm-eval's log-likelihood requests: truncation, batching, rolling windows
    tasks.py    built-in tasks (LAMBADA, rolling perplexity, multiple choice) and metrics
    metrics.py  lm-eval's aggregations and standard errors
    convert.py  public releases (HellaSwag, PIQA, ARC) -> the built-in formats
    overlap.py  n-gram overlap of test sets with the training shards (GPT-2 §4)
    harness.py  an lm-evaluation-harness ``LM`` backed by the project's model
    results.py  results JSON, Markdown table, checkpoint-sweep plots
    driver.py   launch/evaluate.py

docs/eval.md describes the definitions, formats and outputs.
"""
