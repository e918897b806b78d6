"""The model layer (docs/architecture.md, layer 2): the GPT-1/GPT-2 decoder and what builds it.

    gpt.py               the decoder on megatron-core's tensor-parallel layers, its one ``LMHead``
    lm_head.py           the tied output layer and the next-token loss (reference and fused)
    heads.py             GPT-1's fine-tuning head W_y and L3
    kv_cache.py          the KV cache of incremental decoding
    sequence_parallel.py the one sequence-parallel implementation (any device)
    build.py             the only place a ``ModelSpec`` is assembled, from config sections

The pipeline view of the same blocks is ``gpt_dist/pipeline.py``. The TP group comes in
explicitly (``ModelSpec.tp_group``, from the ``ParallelContext``).
"""
