"""Toy data for tests: the toy token shards, the real toy tokenizer that wrote them, and a
tiny real corpus with its own tokenizer and shards.

Test support, not part of the package (it used to be ``gpt_dist/data/testing.py``). Import
it through ``tests.helpers`` (``helpers.toy_shards``, ``helpers.toy_tokenizer``) or directly.

The toy shards hold learnable documents (arithmetic sequences mod 499, each ended by 499)
over a 500-token vocabulary; golden values of the reliability suite and every layout
comparison are measured on them. ``toy_tokenizer`` is a real sentencepiece tokenizer with
exactly that vocabulary (500 pieces, end of document 499), so a run on the toy shards loads
its tokenizer like any other run, and the shards' sidecars record its fingerprint and their
largest token id, which the trainer's data checks verify.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

VOCAB, EOD = 500, 499  # the toy shards' vocabulary: ids < 500, 499 = end of document
_TOKENIZER_DOCS = 150  # standard-library docstrings: enough text for 500 pieces
_BUILDER_VERSION = 1  # bump when toy_tokenizer builds something else


def _cache_root() -> Path:
    return Path(tempfile.gettempdir()) / f"gpt_dist-tests-{os.getuid()}"


def toy_tokenizer(where: Path | str | None = None) -> Path:
    """The toy tokenizer directory (built on first use, then reused): 500 pieces, end of
    document 499, start/delimiter/extract 496-498.

    Trained by the project's ``train_tokenizer`` on a small standard-library corpus; the
    sentencepiece trainer puts its control symbols first (ids 1-4), so the four specials are
    then moved to the top ids of the model (their piece records unchanged, the other pieces
    keep their order): the toy shards' end of document is 499, and their documents and every
    number measured on them stay what they were. ``where``: build there instead of the
    per-user cache, which is keyed on the Python version (the corpus is its docstrings), the
    tokenizer code and this builder, so a stale tokenizer is never reused. Concurrent
    builders are safe: each builds privately and the first rename wins."""
    from gpt_dist import tokenizer as T

    if where is None:
        key = hashlib.sha256(f"{sys.version}|{_BUILDER_VERSION}|".encode()
                             + Path(T.__file__).read_bytes()).hexdigest()[:16]
        where = _cache_root() / f"toy_tokenizer-{key}"
    out = Path(where)
    if (out / T.META_FILE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        from gpt_dist.data.sample_corpus import write_sample_corpus

        corpus = work / "corpus.jsonl"
        write_sample_corpus(corpus, max_bytes=10**9, packages=False, max_docs=_TOKENIZER_DOCS)
        trained = T.train_tokenizer([corpus], VOCAB, work / "trained", num_threads=1)
        if trained.vocab_size != VOCAB:
            raise RuntimeError(f"{work}: the toy corpus gave {trained.vocab_size} pieces, not {VOCAB}")
        _move_specials_last(trained.model_file, work / "final" / T.SP_MODEL)
        tok = T.SentencePieceTokenizer(work / "final" / T.SP_MODEL)
        if (tok.vocab_size, tok.eod_id) != (VOCAB, EOD):
            raise RuntimeError(f"{work}: toy tokenizer has vocab {tok.vocab_size}, eod {tok.eod_id}")
        tok.save(work / "final")
        try:
            os.rename(work / "final", out)
        except OSError:  # another process published it first: same builder, keep theirs
            if not (out / T.META_FILE).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _move_specials_last(src: Path, dst: Path) -> None:
    """Rewrite a sentencepiece model with the four special tokens as its last pieces
    (start, delimiter, extract, then end of document last)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from gpt_dist.tokenizer import SPECIAL_TOKENS

    proto = pb.ModelProto()
    proto.ParseFromString(src.read_bytes())
    order = [SPECIAL_TOKENS[k] for k in ("start", "delimiter", "extract", "eod")]
    pieces = []
    for p in proto.pieces:
        copy = pb.ModelProto.SentencePiece()
        copy.CopyFrom(p)
        pieces.append(copy)
    by_name = {p.piece: p for p in pieces}
    del proto.pieces[:]
    for p in [p for p in pieces if p.piece not in order] + [by_name[s] for s in order]:
        proto.pieces.add().CopyFrom(p)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(proto.SerializeToString())


def toy_fingerprint() -> str:
    """The toy tokenizer's fingerprint (what the toy shards' sidecars record)."""
    from gpt_dist.tokenizer import load_tokenizer

    return load_tokenizer(toy_tokenizer()).fingerprint


def toy_shards(prefix: Path | str, n_docs: int = 300, lengths: tuple[int, int] = (10, 80),
               seed: int = 0) -> Path:
    """``PREFIX.bin/.idx`` + sidecar: ``n_docs`` learnable documents, arithmetic sequences
    mod EOD (start and stride random, length in ``[lengths[0], lengths[1])``), each ended by
    EOD, written by the toy tokenizer (its fingerprint in the sidecar).

    Written with the project's ``ShardWriter`` (megatron-core's ``IndexedDatasetBuilder``
    bytes, tests/data_tools/test_format.py). The documents depend only on the arguments:
    golden values and references built from them are stable."""
    import numpy as np

    from gpt_dist.data.indexed import ShardWriter

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(seed)
    writer = ShardWriter(str(prefix), vocab_size=VOCAB, eod_id=EOD, tokenizer_fingerprint=toy_fingerprint(),
                         dtype=np.uint16)
    for _ in range(n_docs):
        n = rs.randint(*lengths)
        start, k = rs.randint(0, EOD), rs.randint(1, 5)
        toks = [(start + k * i) % EOD for i in range(n)] + [EOD]
        writer.add_document(np.array(toks, dtype=np.uint16))
    writer.finalize()
    writer.commit()
    return prefix


def build_tiny_corpus_and_shards(workdir: str | Path, n_docs: int = 150, vocab_size: int = 512,
                                 shard_tokens: int = 50_000, workers: int = 0) -> tuple[str, str]:
    """``(shard prefix, tokenizer dir)`` under ``workdir``: ``n_docs`` documents from the
    standard library's docstrings, a ``vocab_size`` BPE tokenizer, and shards of about
    ``shard_tokens`` tokens written by the real preprocessing pipeline (several shards, so
    multi-shard code paths get exercised).

    Deterministic for a given Python version. ``workers=0`` runs in-process (fastest for
    tiny inputs, and safe inside test processes that hold threads)."""
    from gpt_dist.data.preprocess import PreprocessConfig, preprocess
    from gpt_dist.data.sample_corpus import write_sample_corpus
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
