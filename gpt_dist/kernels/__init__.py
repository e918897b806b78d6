"""Fused kernels behind one switch (the ``kernels`` config section, ``gpt_dist/config/kernels.py``).

Each kernel is an ``torch.autograd.Function`` whose forward and backward are Triton kernels;
the unfused PyTorch/megatron-core path in ``gpt_dist/model/gpt.py`` stays the reference.

    layernorm.py         LayerNorm forward/backward (megatron-core's fused LN needs Apex or
                         Transformer Engine, neither of which is installed here)
    bias_gelu.py         c_fc bias + GELU(tanh)
    bias_dropout_add.py  bias + dropout + residual; the mask from the caller's RNG region
    cross_entropy.py     vocabulary-parallel softmax cross-entropy over logits, and fused with
                         the tied output layer in chunks of tokens (no whole-vocabulary fp32)
    attention.py         scaled_dot_product_attention pinned to the flash backend
    optim.py             DeepSpeed's FusedAdam with a torch.optim.AdamW-compatible state

Why ours and not ``megatron.core.fusions`` (0.16): its bias-GELU and bias-dropout-add are
``torch.compile``d PyTorch expressions (``megatron.core.jit.jit_fuser``). The bias-dropout-add
one draws its mask inside the compiled graph with Inductor's own Philox stream, so its masks
are not those of the unfused path and its RNG use is not the one our checkpoints restore
exactly; its bias-GELU is offered through ``kernels.compile`` (which compiles the same
expression as part of the block). Its fused cross-entropy still materialises float32 logits
and softmax for the whole local vocabulary and returns a bfloat16 gradient whatever the
logits' dtype; ours streams the vocabulary and never holds a float32 copy.

The Triton modules import ``triton`` at import time; nothing imports them unless a kernel
is switched on. Under ``TRITON_INTERPRET=1`` (set before the import) they run on CPU tensors:
that is how tests/kernels checks them against the reference in CI.
"""
