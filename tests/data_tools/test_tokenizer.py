"""Tokenizers behind one interface (gpt_dist.tokenizer): sentencepiece, GPT-2 BPE, tiktoken."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from gpt_dist.tokenizer import (
    SPECIAL_TOKENS,
    GPT2BPETokenizer,
    TiktokenBPETokenizer,
    TokenizerError,
    load_tokenizer,
    train_tokenizer,
)
from tests.data_tools.dt_common import VOCAB, run_cli

TRICKY = [
    "Hello, world!\n\n  Indented code:\n\tx = 1  # trailing  \n",
    "Unicode: caf\u00e9 na\u00efve \u4e2d\u6587 \U0001f600 \u00a0nbsp \u2028sep",
    "Specials as text: <|endoftext|> <|start|> <|delimiter|> <|extract|>",
    "   leading and trailing spaces   ",
    "",
]


def test_sentencepiece_round_trip(sp_tok, base_docs: list[str]) -> None:
    for text in TRICKY + base_docs[:30]:
        ids = sp_tok.encode(text)
        assert sp_tok.decode(ids) == text
    assert sp_tok.encode_batch(TRICKY) == [sp_tok.encode(t) for t in TRICKY]
    assert sp_tok.vocab_size == VOCAB
    assert max(max(sp_tok.encode(t), default=0) for t in TRICKY) < sp_tok.vocab_size


def test_sentencepiece_special_tokens(sp_tok) -> None:
    ids = sp_tok.special_ids
    assert set(ids) == {"eod", "start", "delimiter", "extract"}
    assert len(set(ids.values())) == 4
    assert all(0 <= i < sp_tok.vocab_size for i in ids.values())
    assert (sp_tok.eod_id, sp_tok.start_id, sp_tok.delimiter_id, sp_tok.extract_id) == (
        ids["eod"], ids["start"], ids["delimiter"], ids["extract"])
    # plain text never produces a control token, even the special strings themselves
    produced = set(sp_tok.encode(TRICKY[2]))
    assert not produced & set(ids.values())
    # decode drops specials, or writes them with keep_special
    seq = [ids["start"], *sp_tok.encode("a b"), ids["delimiter"], *sp_tok.encode("c"), ids["eod"]]
    assert sp_tok.decode(seq) == "a bc"
    assert sp_tok.decode(seq, keep_special=True) == "<|start|>a b<|delimiter|>c<|endoftext|>"


def test_fingerprint_stable_and_sensitive(sp_tok, sp_dir: Path, dt_tmp: Path, base_docs: list[str]) -> None:
    fp = sp_tok.fingerprint
    assert len(fp) == 64
    assert load_tokenizer(sp_dir).fingerprint == fp  # reload
    copy = dt_tmp / "sp_copy"
    shutil.copytree(sp_dir, copy, dirs_exist_ok=True)
    assert load_tokenizer(copy).fingerprint == fp  # a copy elsewhere
    assert load_tokenizer(copy / "tokenizer.model").fingerprint == fp  # the model file alone
    meta = json.loads((sp_dir / "gpt_dist_tokenizer.json").read_text())
    assert meta["fingerprint"] == fp and meta["kind"] == "sentencepiece"
    assert {k: v["id"] for k, v in meta["special_tokens"].items()} == sp_tok.special_ids
    # retraining identically gives identical bytes; another vocabulary another fingerprint
    corpus = dt_tmp / "tok_corpus.jsonl"
    again = train_tokenizer([corpus], VOCAB, dt_tmp / "sp_again", num_threads=1)
    assert again.fingerprint == fp
    other = train_tokenizer([corpus], VOCAB + 40, dt_tmp / "sp_other", num_threads=1)
    assert other.fingerprint != fp


def test_changed_files_detected(sp_dir: Path, dt_tmp: Path) -> None:
    bad = dt_tmp / "sp_tampered"
    shutil.copytree(sp_dir, bad)
    other = train_tokenizer([dt_tmp / "tok_corpus.jsonl"], VOCAB + 20, dt_tmp / "sp_tamper_src", num_threads=1)
    shutil.copyfile(other.model_file, bad / "tokenizer.model")
    with pytest.raises(TokenizerError, match="changed since they were saved") as e:
        load_tokenizer(bad)
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("case", ["missing", "empty_dir", "garbage_model", "bad_meta", "no_specials"])
def test_unreadable_tokenizer_names_the_path(case: str, tmp_path: Path) -> None:
    import sentencepiece as spm

    target = tmp_path / "tok"
    if case != "missing":
        target.mkdir()
    if case == "garbage_model":
        (target / "tokenizer.model").write_bytes(b"this is not a protobuf")
    if case == "bad_meta":
        (target / "gpt_dist_tokenizer.json").write_text("{not json")
    if case == "no_specials":  # a sentencepiece model without the control symbols
        (tmp_path / "c.txt").write_text("some plain text to train on\n" * 50)
        with open("/dev/null", "w") as devnull:
            spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(target / "tokenizer"),
                                           vocab_size=40, model_type="bpe", logstream=devnull)
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(target)
    assert str(target) in str(e.value)
    assert "\n" not in str(e.value)


def test_train_tokenizer_cli(dt_tmp: Path) -> None:
    out = dt_tmp / "cli_tok"
    corpus = dt_tmp / "tok_corpus.jsonl"
    r = run_cli("train_tokenizer.py", "--input", corpus, "--vocab-size", "420", "--out", out)
    assert r.returncode == 0, r.stderr
    assert load_tokenizer(out).vocab_size == 420
    for args, named in ((["--input", dt_tmp / "nope.jsonl", "--vocab-size", "400"], "nope.jsonl"),
                        # fewer pieces than the corpus' characters + 256 bytes: sentencepiece refuses
                        (["--input", corpus, "--vocab-size", "300"], str(dt_tmp / "cli_tok_small"))):
        r = run_cli("train_tokenizer.py", *args, "--out", dt_tmp / "cli_tok_small")
        assert r.returncode == 1
        assert named in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---- GPT-2 byte-level BPE from a toy encoder.json + vocab.bpe ------------------------------

def byte_map() -> dict[int, str]:
    """GPT-2's byte -> unicode table, re-derived here independently of the library."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


TOY_MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"),
              ("l", "d"), ("Ġwor", "ld"), ("Ġ", "t"), ("Ġt", "he")]


@pytest.fixture(scope="module")
def toy_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("gpt2")
    bm = byte_map()
    vocab = {bm[b]: b for b in range(256)}  # ids 0..255 in byte order (not GPT-2's, which is fine)
    for a, b in TOY_MERGES:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (d / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    (d / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in TOY_MERGES), encoding="utf-8")
    # the same vocabulary as a tiktoken ranks file (bytes in base64, rank = id)
    inv = {v: k for k, v in bm.items()}
    lines = [f"{base64.b64encode(bytes(inv[c] for c in tok)).decode()} {i}"
             for tok, i in vocab.items() if tok != "<|endoftext|>"]
    (d / "toy.tiktoken").write_text("\n".join(lines) + "\n")
    return d


def test_gpt2_bpe_toy(toy_gpt2: Path) -> None:
    tok = load_tokenizer(toy_gpt2)
    assert isinstance(tok, GPT2BPETokenizer)
    enc = json.loads((toy_gpt2 / "encoder.json").read_text())
    ids = tok.encode("hello world the")
    assert ids == [enc["hello"], enc["Ġworld"], enc["Ġthe"]]
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text
    n = len(enc)
    assert tok.special_ids == {"eod": enc["<|endoftext|>"], "start": n, "delimiter": n + 1, "extract": n + 2}
    assert tok.vocab_size == n + 3
    assert enc["<|endoftext|>"] not in tok.encode("<|endoftext|>")  # text, not the control token
    assert tok.decode([tok.start_id, *ids, tok.eod_id], keep_special=True) == "<|start|>hello world the<|endoftext|>"
    assert load_tokenizer(toy_gpt2).fingerprint == tok.fingerprint
    saved = tok.save(toy_gpt2.parent / "gpt2_saved")
    assert load_tokenizer(saved).fingerprint == tok.fingerprint


def test_tiktoken_file_matches_gpt2_bpe(toy_gpt2: Path) -> None:
    gpt2 = GPT2BPETokenizer(toy_gpt2 / "encoder.json", toy_gpt2 / "vocab.bpe")
    tt = load_tokenizer(toy_gpt2 / "toy.tiktoken")
    assert isinstance(tt, TiktokenBPETokenizer)
    for text in ["hello world the", *TRICKY]:
        assert tt.encode(text) == gpt2.encode(text)
        assert tt.decode(tt.encode(text)) == text
    assert tt.special_ids == gpt2.special_ids  # eod right after the ranks, then the GPT-1 tokens
    assert tt.fingerprint != gpt2.fingerprint  # different kind and files
    # the engine moved from tokenizers to tiktoken; the fingerprints (and so every shard and
    # export made before) did not: these are the values the tokenizers-engine code gave
    assert gpt2.engine == tt.engine == "tiktoken"
    assert gpt2.fingerprint == "d0584a85a38943ebf60a3b005ab82da63b67e3bb52a66b82c18c7349c15075f3"
    assert tt.fingerprint == "a19412acad6293a2af56cdb54d982c4d75f0b4ea2f37751767c065f41ebe2a22"


def test_gpt2_bad_files(tmp_path: Path, toy_gpt2: Path) -> None:
    d = tmp_path / "bad"
    shutil.copytree(toy_gpt2, d)
    (d / "vocab.bpe").write_text("#version: 0.2\nh e x\n")
    with pytest.raises(TokenizerError, match="vocab.bpe:2"):
        load_tokenizer(d)
    (d / "encoder.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="encoder.json"):
        load_tokenizer(d)
    (tmp_path / "x.tiktoken").write_text("not-base64!! zero\n")
    with pytest.raises(TokenizerError, match="x.tiktoken"):
        load_tokenizer(tmp_path / "x.tiktoken")


def test_special_token_names() -> None:
    assert SPECIAL_TOKENS == {"eod": "<|endoftext|>", "start": "<|start|>", "delimiter": "<|delimiter|>",
                              "extract": "<|extract|>"}
