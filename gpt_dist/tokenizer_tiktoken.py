"""GPT-2 byte-level BPE as a ``tiktoken.Encoding``, built from local files (nothing fetched).

Why: tiktoken encodes GPT-2's BPE about 6x faster per core than Hugging Face ``tokenizers``,
which made the GPT-2 path of preprocessing run at a small fraction of the bare encoder's
speed. ``gpt_dist.tokenizer`` encodes and decodes with the :class:`tiktoken.Encoding` made
here and keeps a ``tokenizers`` engine of the same BPE only for what needs one (the Hugging
Face export's ``tokenizer.json``, and vocabularies tiktoken cannot run with the same ids).

The two engines rank merges differently: ``tokenizers`` by the pair's line in ``vocab.bpe``,
tiktoken by the rank of the merged bytes, which is also the token id it emits. They give the
same ids when every multi-byte token is the result of exactly one merge and the ids of the
merge results increase in merge order: true of GPT-2's own ``encoder.json`` + ``vocab.bpe``
(tiktoken's ``r50k_base`` is exactly those ids) and of what a ``tokenizers`` BPE trainer
writes. :func:`encoding_from_gpt2_files` checks that and returns ``None`` otherwise, so
the caller keeps the exact engine instead of emitting other ids.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

#: GPT-2's pre-tokenizer split (``encoder.py``; tiktoken's ``r50k_base``; the ``ByteLevel``
#: pre-tokenizer's regex in ``tokenizers``).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (``encoder.py`` in GPT-2)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def make_encoding(name: str, ranks: dict[bytes, int], eod_token: str, eod_id: int) -> Any:
    """A tiktoken ``Encoding`` with GPT-2's split. ``eod_token`` is registered as a special
    token only so that decoding its id works; callers encode with ``encode_ordinary``, so the
    text ``<|endoftext|>`` is never split out of plain text (as with ``tokenizers``, where it
    is not registered either)."""
    import tiktoken

    specials = {} if eod_id in ranks.values() else {eod_token: eod_id}
    return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def gpt2_ranks(vocab: dict[str, int], merges: Sequence[tuple[str, str]], eod_token: str) -> dict[bytes, int] | None:
    """tiktoken's mergeable ranks for ``encoder.json`` + ``vocab.bpe``, or ``None`` when the
    ids cannot double as ranks (see the module docstring): a token that is neither a byte nor
    one merge's result, a merge of pieces missing from the vocabulary, a merge result made
    twice or missing, or merge results whose ids do not increase in merge order.

    Every preprocessing worker runs this at start-up, so the per-token work is C (``map``,
    ``str.translate``) rather than a Python loop over GPT-2's 50,000 merges."""
    made = [a + b for a, b in merges]
    ids = list(map(vocab.get, made))
    if None in ids or ids != sorted(ids) or len(set(ids)) != len(ids):  # strictly increasing, made once
        return None
    if not all(map(vocab.__contains__, (piece for pair in merges for piece in pair))):
        return None
    byte_map = bytes_to_unicode()
    tokens = [t for t in vocab if t != eod_token]
    if len(tokens) != len(made) + 256 or not set(byte_map.values()) <= vocab.keys():
        return None
    if not set("".join(tokens)) <= set(byte_map.values()):  # a character outside GPT-2's byte map
        return None
    # each character -> the code point of its byte, so latin-1 gives the token's bytes
    table = str.maketrans({c: chr(b) for b, c in byte_map.items()})
    return {t.translate(table).encode("latin-1"): vocab[t] for t in tokens}


def recover_merges(ranks: dict[bytes, int]) -> Iterator[tuple[bytes, bytes]]:
    """The merge that made each multi-byte token: BPE over its bytes with lower ranks only
    ends in exactly two parts (the method tiktoken's own GPT-2 conversion relies on)."""
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best, best_rank = -1, rank
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < best_rank:
                    best, best_rank = i, r
            if best < 0:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) == 2:
            yield parts[0], parts[1]
