"""Zero-shot evaluation (GPT-2 §3) on the project's own parallel model.

    model.py    the model under evaluation: the inference runtime's model, loaded as an LM
    scoring.py  lm-eval's log-likelihood requests: truncation, batching, rolling windows
    tasks.py    built-in tasks (LAMBADA, rolling perplexity, multiple choice) and metrics
    metrics.py  lm-eval's aggregations and standard errors
    convert.py  public releases (HellaSwag, PIQA, ARC) -> the built-in formats
    overlap.py  n-gram overlap of test sets with the training shards (GPT-2 §4)
    harness.py  an lm-evaluation-harness ``LM`` backed by the project's model
    results.py  results JSON, Markdown table, checkpoint-sweep plots
    training.py zero-shot tasks during pretraining (also under ZeRO-3)
    driver.py   launch/evaluate.py

Loading, forward passes (KV cache, pipeline stages, vocabulary-parallel scores) are the
inference runtime's (``gpt_dist.inference``); this package holds what is evaluation's own.

docs/eval.md describes the definitions, formats and outputs.
"""
