"""gpt_dist: GPT-1/GPT-2 pretraining, fine-tuning and evaluation on DeepSpeed + megatron-core."""

__version__ = "0.1.0"

import warnings as _warnings

# megatron-core announces on import, once per module, that the optional Transformer Engine
# and Apex kernels are absent and it falls back to PyTorch; that fallback is what gpt_dist
# uses on purpose, so the four warnings would only hide the messages that matter.
_warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
_warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
