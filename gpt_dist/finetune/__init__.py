"""GPT-1 supervised fine-tuning (Radford et al. 2018, §3.2-3.3, Figure 1).

This package holds the parts that do not touch the model: task files and their input
transformations (:mod:`.tasks`), batching, epoch order and data-parallel sharding
(:mod:`.batches`) and the task metrics (:mod:`.metrics`). Keeping them free of the engine
lets them be tested exhaustively on a CPU in a second, and lets ``launch/predict.py`` and
the training loop share one definition of what the model sees.

The run itself: :mod:`.task_data` reads and checks the task files before any process group
exists (the schedule is derived from their size: ``FinetuneConfig.schedule``); :mod:`.session` (``finetune(cfg)``, launch/finetune.py) runs
the training session of ``gpt_dist.training.session`` with :mod:`.objective`'s
``TaskObjective``, keeps the best model and writes the predictions and results.
"""
