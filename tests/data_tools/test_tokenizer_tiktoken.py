"""GPT-2 BPE on tiktoken (gpt_dist.tokenizer_tiktoken): the same ids and text as the
``tokenizers`` engine it replaced and as transformers' GPT2TokenizerFast, on every text."""

from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path

import pytest

from gpt_dist.tokenizer import GPT2BPETokenizer, TiktokenBPETokenizer, TokenizerError, load_tokenizer
from gpt_dist.tokenizer_tiktoken import bytes_to_unicode, gpt2_ranks, make_encoding

EOT = "<|endoftext|>"

TEXTS = [
    # whitespace runs (GPT-2's \s+(?!\S) rule), tabs, CR/LF, non-ASCII spaces
    "a  b   c    d", "   leading", "trailing   ", " ", "  ", "\n", "\n\n\n", "x\n\n  y", "\t\tindent\n\t",
    "line\r\nline\r\n", "a \n b", "no\u00a0break\u3000ideographic\u2028sep\u2029para", "end with space ",
    # contractions (lower case only in GPT-2's pattern), quotes
    "I'm sure you're right, we've seen they'll say he'd it's don't", "I'M SHE'LL 'S 'tis O'Neil", "''' ' '",
    # digits, numbers, other numerals
    "12345 3.14159 1,000,000 -7 +8e-3 0x1F", "٣٤٥ ৩৪ 四五 ²³ ½ Ⅻ", "2026-12-06T01:40:41Z",
    # non-Latin scripts, combining marks, right-to-left
    "中文文本和日本語のテキスト、한국어 텍스트", "Русский текст, ελληνικά", "العربية עברית",
    "हिन्दी ภาษาไทย", "e\u0301 n\u0303 a\u030a\u0323", "Ǆ ǅ ǆ ﬁ ﬂ",
    # emoji: single, skin tone, ZWJ sequences, flags, keycaps
    "😀 👍🏽 👨\u200d👩\u200d👧 🇺🇳🇫🇷 1\ufe0f\u20e3 🏳️\u200d🌈",
    # text that looks like special tokens: plain text, never split out
    f"{EOT}", f"a{EOT}b", f"{EOT}{EOT} <|start|> <|delimiter|> <|extract|>", "<|endoftext", "|>",
    # what decoding invalid UTF-8 with errors="replace" leaves
    b"ok \xff\xfe bad \xc3( cut \xe2\x82".decode("utf-8", "replace"),
    # code and punctuation runs
    "def f(x):\n    return x ** 2  # comment\r\n", "!!!??? ... --- ***", "",
]


def _fuzz(n: int, seed: int) -> list[str]:
    """Random strings over characters where splits and merges are easy to get wrong."""
    pool = list(" \t\n\r\u00a0\u3000'sdmtlvre0123456789.,;!?-_()<|>helloworld") + \
        list("中文日本語한국éñüßЖжλ😀👍🏽\u200d\u0301ﬁ٣") + ["'s", "'ll", "  ", "\n\n", EOT]
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def trained_gpt2(tmp_path_factory: pytest.TempPathFactory, base_docs: list[str]) -> Path:
    """A GPT-2-style ``encoder.json`` + ``vocab.bpe`` trained by ``tokenizers`` on English
    and the scripts above (1,200 tokens: enough merges to cover words, digits and UTF-8)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    eng = Tokenizer(models.BPE())
    eng.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    eng.train_from_iterator(base_docs + TEXTS * 20, trainers.BpeTrainer(
        vocab_size=1200, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(eng.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab[EOT] = len(vocab)
    d = tmp_path_factory.mktemp("gpt2_trained")
    (d / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (d / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return d


def _hf(d: Path):
    from transformers import GPT2TokenizerFast

    # split_special_tokens: "<|endoftext|>" in text is text, as in the project's tokenizer
    return GPT2TokenizerFast(vocab=str(d / "encoder.json"), merges=str(d / "vocab.bpe"), split_special_tokens=True)


def _old(tok, text: str) -> list[int]:
    """The engine the project encoded with before tiktoken (still built for the HF export)."""
    return tok._engine.encode(text, add_special_tokens=False).ids


def _all_texts(base_docs: list[str]) -> list[str]:
    return TEXTS + base_docs + _fuzz(400, seed=21)


def test_ids_equal_tokenizers_and_gpt2_tokenizer_fast(trained_gpt2: Path, base_docs: list[str]) -> None:
    tok = load_tokenizer(trained_gpt2)
    assert isinstance(tok, GPT2BPETokenizer) and tok.engine == "tiktoken"
    hf = _hf(trained_gpt2)
    texts = _all_texts(base_docs)
    batch = tok.encode_batch(texts)
    merged = 0
    for text, ids in zip(texts, batch):
        assert ids == tok.encode(text) == _old(tok, text), text
        assert ids == hf(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(ids) == text, text
        merged += sum(i >= 256 for i in ids)
    assert merged > 10_000  # the merges really ran (not a byte-by-byte vocabulary)
    eot = tok.eod_id
    assert all(eot not in ids for ids in batch)  # the special token never comes out of text


def test_decode_equal_on_any_ids(trained_gpt2: Path) -> None:
    """Arbitrary id sequences, invalid UTF-8 included (a multi-byte character cut between
    tokens): tiktoken's decode gives the same replacement characters as tokenizers'."""
    tok = load_tokenizer(trained_gpt2)
    hf = _hf(trained_gpt2)
    rng = random.Random(5)
    n = tok.vocab_size - 3
    seqs = [[rng.randrange(n - 1) for _ in range(rng.randint(1, 12))] for _ in range(500)]
    seqs += [[rng.randrange(128, 256) for _ in range(rng.randint(1, 6))] for _ in range(300)]  # lone UTF-8 bytes
    invalid = 0
    for ids in seqs:
        text = tok.decode(ids)
        assert text == tok._engine.decode(ids, skip_special_tokens=False) == hf.decode(ids), ids
        invalid += "\ufffd" in text
    assert invalid > 100
    seq = [tok.start_id, *tok.encode("a b"), tok.eod_id]
    assert tok.decode(seq, keep_special=True) == "<|start|>a b<|endoftext|>"
    assert tok.decode(seq) == "a b"


def test_lone_surrogates_encode_as_replacement_character(trained_gpt2: Path) -> None:
    """Text decoded from invalid UTF-8 with ``surrogateescape`` (or JSON's lone ``\\udXXX``):
    tokenizers refused it; tiktoken encodes each lone surrogate as U+FFFD, which is what
    preprocessing's cleaning turns them into before tokenizing."""
    tok = load_tokenizer(trained_gpt2)
    raw = b"caf\xc3\xa9 \xff\xfe and \xed\xa0\x80 end".decode("utf-8", "surrogateescape")
    assert any(0xD800 <= ord(c) <= 0xDFFF for c in raw)
    fixed = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in raw)
    assert tok.encode(raw) == _old(tok, fixed) == tok.encode_batch([raw])[0]


def test_tiktoken_ranks_file_equals_the_gpt2_files(trained_gpt2: Path, base_docs: list[str], tmp_path: Path) -> None:
    """The same BPE as a tiktoken ranks file: tiktoken runs the ranks as they are; the
    merges recovered from them for ``tokenizers`` (the HF export) give the same ids."""
    vocab = json.loads((trained_gpt2 / "encoder.json").read_text())
    inv = {c: b for b, c in bytes_to_unicode().items()}
    lines = [f"{base64.b64encode(bytes(inv[c] for c in t)).decode()} {i}" for t, i in vocab.items() if t != EOT]
    (tmp_path / "trained.tiktoken").write_text("\n".join(lines) + "\n")
    gpt2 = load_tokenizer(trained_gpt2)
    tt = load_tokenizer(tmp_path / "trained.tiktoken")
    assert isinstance(tt, TiktokenBPETokenizer) and tt.engine == "tiktoken"
    assert tt.special_ids == gpt2.special_ids
    for text in _all_texts(base_docs)[:300]:
        ids = tt.encode(text)
        assert ids == gpt2.encode(text) == _old(tt, text), text


def test_ids_that_are_not_ranks_keep_the_exact_engine(trained_gpt2: Path, base_docs: list[str],
                                                      tmp_path: Path) -> None:
    """A vocabulary whose merge results' ids do not increase in merge order (two swapped):
    tiktoken would emit other ids, so the tokenizer stays on ``tokenizers``, still equal to
    GPT2TokenizerFast."""
    d = tmp_path / "swapped"
    shutil.copytree(trained_gpt2, d)
    vocab = json.loads((d / "encoder.json").read_text())
    merges = [tuple(line.split(" ")) for line in (d / "vocab.bpe").read_text().splitlines()[1:] if line]
    first, last = merges[0][0] + merges[0][1], merges[-1][0] + merges[-1][1]
    vocab[first], vocab[last] = vocab[last], vocab[first]
    (d / "encoder.json").write_text(json.dumps(vocab))
    assert gpt2_ranks(vocab, merges, EOT) is None
    tok = load_tokenizer(d)
    assert tok.engine == "tokenizers"
    hf = _hf(d)
    texts = _all_texts(base_docs)[:200]
    assert [tok.encode(t) for t in texts] == [hf(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert any(vocab[last] in ids for ids in tok.encode_batch(texts))  # the swapped id is emitted


def test_negative_control_perturbed_rank_is_caught(trained_gpt2: Path, base_docs: list[str]) -> None:
    """The comparison above can fail: one merge moved to the end of the ranks changes ids."""
    tok = load_tokenizer(trained_gpt2)
    vocab = json.loads((trained_gpt2 / "encoder.json").read_text())
    merges = [tuple(line.split(" ")) for line in (trained_gpt2 / "vocab.bpe").read_text().splitlines()[1:] if line]
    ranks = gpt2_ranks(vocab, merges, EOT)
    assert ranks is not None
    moved = bytes({c: b for b, c in bytes_to_unicode().items()}[c] for c in merges[0][0] + merges[0][1])
    ranks[moved] = len(vocab) + 10  # lowest merge priority, and another id
    bad = make_encoding("perturbed", ranks, EOT, vocab[EOT])
    texts = _all_texts(base_docs)
    assert sum(bad.encode_ordinary(t) != _old(tok, t) for t in texts) > 10


def test_ranks_equal_tiktokens_own_gpt2_loader(trained_gpt2: Path, tmp_path: Path, monkeypatch) -> None:
    """Files in GPT-2's own layout (byte ids in GPT-2's order, merge i = id 256 + i, the end
    token last): the ranks built here equal what tiktoken's loader for GPT-2's released
    files (``data_gym_to_mergeable_bpe_ranks``, behind ``get_encoding("gpt2")``) makes."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    merges = [tuple(line.split(" ")) for line in (trained_gpt2 / "vocab.bpe").read_text().splitlines()[1:] if line]
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab[EOT] = len(vocab)
    (tmp_path / "encoder.json").write_text(json.dumps(vocab))
    shutil.copyfile(trained_gpt2 / "vocab.bpe", tmp_path / "vocab.bpe")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read these files, not a cached copy
    theirs = data_gym_to_mergeable_bpe_ranks(str(tmp_path / "vocab.bpe"), str(tmp_path / "encoder.json"))
    assert gpt2_ranks(vocab, merges, EOT) == theirs
    tok = load_tokenizer(tmp_path)
    assert tok.engine == "tiktoken" and tok.eod_id == len(theirs) == tok.vocab_size - 4



def test_preprocess_with_gpt2_bpe_writes_the_former_engines_tokens(trained_gpt2: Path, base_docs: list[str],
                                                                   tmp_path: Path) -> None:
    """The whole pipeline (2 forked workers, which take the parent's loaded tokenizer) writes,
    per document, the ids ``tokenizers`` gives the cleaned text, then ``<|endoftext|>``."""
    import numpy as np

    from gpt_dist.data.clean import clean_text
    from gpt_dist.data.indexed import list_shards, read_index_arrays
    from gpt_dist.data.preprocess import PreprocessConfig, preprocess

    docs = base_docs[:100]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    manifest = preprocess(PreprocessConfig(inputs=[str(tmp_path / "in.jsonl")], tokenizer=str(trained_gpt2),
                                           output_prefix=str(tmp_path / "out" / "c"), workers=2, progress=False))
    tok = load_tokenizer(trained_gpt2)
    assert manifest["tokenizer"]["fingerprint"] == tok.fingerprint
    written: list[list[int]] = []
    for shard in list_shards(str(tmp_path / "out" / "c")):
        lengths, _ = read_index_arrays(shard)
        flat = np.fromfile(shard + ".bin", dtype=np.uint16).tolist()
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
        written += [flat[s:s + n] for s, n in zip(starts, lengths.tolist())]
    assert written == [_old(tok, clean_text(t).text) + [tok.eod_id] for t in docs]


def test_merge_of_unknown_piece_fails_at_load(trained_gpt2: Path, tmp_path: Path) -> None:
    """A ``vocab.bpe`` merging a piece the vocabulary lacks: refused when loading (one line
    naming the directory), not later in a preprocessing worker or the export."""
    d = tmp_path / "bad_merge"
    shutil.copytree(trained_gpt2, d)
    vocab = json.loads((d / "encoder.json").read_text())
    merges = (d / "vocab.bpe").read_text().splitlines()
    b = merges[-1].split(" ")[1]
    del vocab[b]  # the merge's second piece is gone; renumber to keep the ids contiguous
    vocab = {t: i for i, t in enumerate(sorted(vocab, key=vocab.__getitem__))}
    (d / "encoder.json").write_text(json.dumps(vocab))
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(d)
    assert str(d) in str(e.value) and "\n" not in str(e.value)
    # the check itself: a merge whose result is known but one of whose pieces is not
    byte_vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    assert gpt2_ranks({**byte_vocab, "ab": 256, "abc": 257}, [("a", "b"), ("ab", "c")], EOT) is not None
    assert gpt2_ranks({**byte_vocab, "ab": 256, "abc": 257}, [("a", "b"), ("a", "bc")], EOT) is None
