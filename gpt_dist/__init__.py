"""gpt_dist: GPT-1/GPT-2 pretraining, fine-tuning and evaluation on DeepSpeed + megatron-core."""

__version__ = "0.1.0"
