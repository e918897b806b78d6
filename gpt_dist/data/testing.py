"""Small deterministic data for tests and for the trainer's own checks.

``build_tiny_corpus_and_shards`` makes, in a few seconds, what a real run makes in
hours: a corpus of real English (standard-library docstrings, see ``sample_corpus``),
a sentencepiece tokenizer trained on it and shards written by the real pipeline.
"""

from __future__ import annotations

from pathlib import Path

from gpt_dist.data.sample_corpus import write_sample_corpus


def build_tiny_corpus_and_shards(workdir: str | Path, n_docs: int = 150, vocab_size: int = 512,
                                 shard_tokens: int = 50_000, workers: int = 0) -> tuple[str, str]:
    """``(shard prefix, tokenizer dir)`` under ``workdir``: ``n_docs`` documents from the
    standard library's docstrings, a ``vocab_size`` BPE tokenizer, and shards of about
    ``shard_tokens`` tokens (several shards, so multi-shard code paths get exercised).

    Deterministic for a given Python version. ``workers=0`` runs in-process (fastest for
    tiny inputs, and safe inside test processes that hold threads).
    """
    from gpt_dist.data.preprocess import PreprocessConfig, preprocess
    from gpt_dist.tokenizer import train_tokenizer

    work = Path(workdir)
    corpus = work / "corpus.jsonl"
    if not corpus.exists():
        write_sample_corpus(corpus, max_bytes=10**9, packages=False, max_docs=n_docs)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "gpt_dist_tokenizer.json").exists():
        train_tokenizer([corpus], vocab_size, tok_dir, num_threads=2)
    prefix = str(work / "shards" / "tiny")
    preprocess(PreprocessConfig(inputs=[str(corpus)], tokenizer=str(tok_dir), output_prefix=prefix,
                                workers=workers, shard_tokens=shard_tokens, progress=False))
    return prefix, str(tok_dir)
