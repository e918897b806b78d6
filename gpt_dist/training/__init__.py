"""The training core, shared by pretraining and fine-tuning.

    session.py     the one training session: context, seeds, run directory, logger, engine,
                   checkpoint.init_from, resume, the loop, tear-down on every exit path
    pretrain.py    pretraining, an application of the core: ``LMObjective`` and ``pretrain(cfg)``
                   (launch/pretrain.py); the core's other modules import it nowhere
    loop.py        ``train_loop``, one optimizer step, checkpoint save and resume calls
    objective.py   what a run optimises: the ``Objective`` interface
    engine.py      the DeepSpeed engine: its config, optimizer, LR schedule, non-finite guard
    init_from.py   a model's weights loaded into a freshly built engine, any layout
    checkpoint.py  crash-safe checkpoints (verify, commit, retention, disk full)
    data.py        megatron-core datasets; the data position is ``consumed_samples``
    hooks.py       the points where a caller (the tests) may watch or perturb a run
    metrics.py     rank-0 logging: metrics.jsonl, console, TensorBoard, MFU

Private DeepSpeed behaviour it relies on goes through ``gpt_dist.deepspeed_compat``.
"""
