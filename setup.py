"""gpt_dist: distributed GPT-1/GPT-2 training on DeepSpeed and megatron-core."""
from setuptools import find_packages, setup

setup(
    name="gpt_dist",
    version="0.1.0",
    description="Distributed GPT-1/GPT-2 pretraining, fine-tuning and evaluation on DeepSpeed + megatron-core",
    python_requires=">=3.11",
    packages=find_packages(include=["gpt_dist", "gpt_dist.*"]),
    install_requires=[
        # The CPU wheel (2.13.0) must already be installed by the Makefile; this range
        # is satisfied by it, so pip never pulls a multi-GB CUDA build here.
        "torch>=2.10,<2.15",
        "deepspeed>=0.18,<0.20",
        "megatron-core>=0.16,<0.18",
        "numpy>=1.26",
        "sentencepiece>=0.2",
        "tiktoken>=0.7",  # GPT-2 byte-level BPE at tiktoken's speed (gpt_dist/tokenizer.py)
        "mpi4py>=3.1",
        "tensorboard>=2.15",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "datasketch>=1.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        # Triton for the fused kernels (gpt_dist/kernels). CUDA builds of torch pin their own
        # Triton (torch 2.13: 3.7.1; torch 2.11: 3.6.0); the CPU wheel pins none, so the tests
        # (Triton's interpreter, TRITON_INTERPRET=1) pin torch 2.13's.
        "kernels": ["triton>=3.6,<3.8"],
        # lm-evaluation-harness for `launch/evaluate.py --harness lm-eval` (gpt_dist/eval/harness.py);
        # its hf backend (the reference the eval tests and bench/eval_bench.py compare with) imports
        # accelerate. Neither replaces the installed torch (checked with 2.13.0+cpu).
        "eval": ["lm-eval==0.4.13", "accelerate>=0.26", "transformers>=4.45"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "transformers>=4.45", "ruff>=0.6", "scikit-learn>=1.3", "scipy>=1.10",
                 "triton==3.7.1", "lm-eval==0.4.13", "accelerate>=0.26"],
        "mpi": ["mpich"],
    },
)
