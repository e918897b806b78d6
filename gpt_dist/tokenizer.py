"""Tokenizers behind one interface: sentencepiece BPE (trained here) and GPT-2 byte-level BPE.

Why one interface: preprocessing, training, fine-tuning, evaluation and generation must
agree on the ids of the end-of-document token and of the three GPT-1 fine-tuning tokens
(start, delimiter, extract), and every artefact that stores token ids records the
tokenizer's ``fingerprint`` so a mismatch is caught instead of training on garbage.

Kinds:

* ``sentencepiece``: trained by :func:`train_tokenizer` (``data_tools/train_tokenizer.py``)
  with ``model_type=bpe``, byte fallback (no unknown tokens), identity normalization and
  no whitespace collapsing, so ``decode(encode(text)) == text`` and the model converts
  faithfully to a Hugging Face fast tokenizer. The four special tokens are *control*
  symbols: plain text never encodes to them, even text that contains ``<|endoftext|>``.
* ``gpt2_bpe``: GPT-2's byte-level BPE from local ``encoder.json`` + ``vocab.bpe``
  (nothing is fetched), encoded by tiktoken with the ids as ranks. ``<|endoftext|>`` is
  50256; start, delimiter and extract are appended after the base vocabulary.
* ``tiktoken``: a tiktoken-format ranks file (``base64-token rank`` per line) with GPT-2's
  pre-tokenizer, encoded by tiktoken; for the Hugging Face export the merges are
  recovered from the ranks and run by ``tokenizers``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from gpt_dist.data.readers import iter_texts
from gpt_dist.tokenizer_tiktoken import bytes_to_unicode, gpt2_ranks, make_encoding, recover_merges
from gpt_dist.utils import atomic_write_json

SPECIAL_TOKENS: dict[str, str] = {
    "eod": "<|endoftext|>",
    "start": "<|start|>",
    "delimiter": "<|delimiter|>",
    "extract": "<|extract|>",
}
META_FILE = "gpt_dist_tokenizer.json"
SP_MODEL = "tokenizer.model"
FORMAT_VERSION = 1


class TokenizerError(ValueError):
    """A tokenizer could not be loaded or trained; the message names the path."""


class Tokenizer(ABC):
    """Common interface of every tokenizer kind (see the module docstring)."""

    kind: str = ""

    @abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """The real vocabulary (special tokens included), before any padding for TP."""

    @property
    @abstractmethod
    def special_ids(self) -> dict[str, int]:
        """``{"eod": id, "start": id, "delimiter": id, "extract": id}``."""

    @abstractmethod
    def files(self) -> list[Path]:
        """The files needed to load this tokenizer again."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; never adds BOS/EOS and never emits a special id."""
        return self._encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts (kinds override this with a faster batch call)."""
        return [self._encode(t) for t in texts]

    def decode(self, ids: Sequence[int], keep_special: bool = False) -> str:
        """Text of ``ids``. Special ids are dropped, or written as their token strings
        (``<|endoftext|>`` ...) with ``keep_special``."""
        by_id = {i: SPECIAL_TOKENS[name] for name, i in self.special_ids.items()}
        out: list[str] = []
        run: list[int] = []
        for i in (int(x) for x in ids):
            if i in by_id:
                if run:
                    out.append(self._decode(run))
                    run = []
                if keep_special:
                    out.append(by_id[i])
            else:
                run.append(i)
        if run:
            out.append(self._decode(run))
        return "".join(out)

    @property
    def eod_id(self) -> int:
        return self.special_ids["eod"]

    @property
    def start_id(self) -> int:
        return self.special_ids["start"]

    @property
    def delimiter_id(self) -> int:
        return self.special_ids["delimiter"]

    @property
    def extract_id(self) -> int:
        return self.special_ids["extract"]

    def _fingerprint_extra(self) -> dict[str, Any]:
        return {}

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the kind, each file's name and content, and the special-token map.

        Paths are not hashed (only base names), so a copied tokenizer keeps its fingerprint.
        """
        h = hashlib.sha256()
        h.update(f"gpt_dist-tokenizer-v{FORMAT_VERSION}:{self.kind}\n".encode())
        for f in sorted(self.files(), key=lambda p: p.name):
            h.update(f"{f.name}:{_sha256_file(f)}\n".encode())
        specials = {SPECIAL_TOKENS[k]: v for k, v in sorted(self.special_ids.items())}
        h.update(json.dumps({"special": specials, "vocab_size": self.vocab_size,
                             **self._fingerprint_extra()}, sort_keys=True).encode())
        return h.hexdigest()

    def metadata(self) -> dict[str, Any]:
        """What ``gpt_dist_tokenizer.json`` records."""
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "files": [f.name for f in self.files()],
            "vocab_size": self.vocab_size,
            "special_tokens": {name: {"token": SPECIAL_TOKENS[name], "id": i}
                               for name, i in self.special_ids.items()},
            "fingerprint": self.fingerprint,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Copy the tokenizer files and write ``gpt_dist_tokenizer.json`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for f in self.files():
            if f.resolve() != (out / f.name).resolve():
                shutil.copyfile(f, out / f.name)
        atomic_write_json(out / META_FILE, self.metadata(), indent=2)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model whose control symbols are the four special tokens."""

    kind = "sentencepiece"

    def __init__(self, model_file: str | Path) -> None:
        import sentencepiece as spm

        self.model_file = Path(model_file)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"{self.model_file}: not a sentencepiece model ({_first_line(exc)})") from None
        ids: dict[str, int] = {}
        for name, token in SPECIAL_TOKENS.items():
            i = self._sp.piece_to_id(token)
            if i == self._sp.unk_id() or not self._sp.is_control(i):
                raise TokenizerError(f"{self.model_file}: lacks the control symbol {token} "
                                     "(train it with data_tools/train_tokenizer.py)")
            ids[name] = i
        self._special = ids

    def _encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # one thread: callers parallelise with processes (preprocess workers)
        return self._sp.encode(list(texts), num_threads=1)

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self._special)

    def files(self) -> list[Path]:
        return [self.model_file]


class _ByteLevelBPE(Tokenizer):
    """GPT-2 byte-level BPE, no network: encoded and decoded by tiktoken (see
    ``gpt_dist.tokenizer_tiktoken``), with the same BPE as a Hugging Face ``tokenizers``
    engine built on first use (``_engine``: the Hugging Face export saves it as
    ``tokenizer.json``; vocabularies whose ids tiktoken cannot reproduce run on it)."""

    def _init_engine(self, vocab: dict[str, int], merges: Any, where: Path,
                     ranks: dict[bytes, int] | None) -> None:
        """``merges``: the ``(a, b)`` pairs, or a callable giving them (recovering them from a
        ranks file costs seconds at GPT-2's size, and only the ``tokenizers`` engine needs them).
        ``ranks``: tiktoken's mergeable ranks, ``None`` to run on ``tokenizers``."""
        eod = vocab.get(SPECIAL_TOKENS["eod"])
        if eod is None:  # a ranks file without it: GPT-2 puts it right after the ranks
            eod = max(vocab.values()) + 1
        base = max(max(vocab.values()), eod) + 1
        if len(vocab) + (SPECIAL_TOKENS["eod"] not in vocab) != base:
            raise TokenizerError(f"{where}: token ids are not contiguous 0..{base - 1}")
        self._vocab, self._merges, self._where, self._ranks, self._base = vocab, merges, where, ranks, base
        self._special = {"eod": eod, "start": base, "delimiter": base + 1, "extract": base + 2}
        if ranks is None:
            self._engine  # noqa: B018 - build it now: bad files fail at load, as before

    @property
    def engine(self) -> str:
        """Which library encodes: ``"tiktoken"``, or ``"tokenizers"`` for vocabularies whose
        ids are not tiktoken ranks."""
        return "tokenizers" if self._ranks is None else "tiktoken"

    @cached_property
    def _tt(self) -> Any:
        """The tiktoken ``Encoding``, built on first use: preprocessing's parent process only
        reads the fingerprint and special ids, and forked workers build their own."""
        eod = self._special["eod"]
        return None if self._ranks is None else make_encoding(f"gpt_dist-{self.kind}", self._ranks,
                                                              SPECIAL_TOKENS["eod"], eod)

    @cached_property
    def _engine(self) -> Any:
        """The BPE as a ``tokenizers.Tokenizer`` (GPT-2's regex split, no prefix space)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        merges = self._merges() if callable(self._merges) else self._merges
        try:
            engine = HFTokenizer(models.BPE(vocab=self._vocab, merges=merges))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception
            raise TokenizerError(f"{self._where}: invalid BPE vocabulary/merges ({_first_line(exc)})") from None
        # "<|endoftext|>" is not registered: as text it encodes as ordinary pieces (tiktoken: encode_ordinary)
        engine.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        engine.decoder = decoders.ByteLevel()
        return engine

    def _encode(self, text: str) -> list[int]:
        # lone surrogates (not UTF-8): tiktoken encodes them as U+FFFD, as preprocessing's
        # cleaning replaces them; tokenizers refused them (TypeError)
        if self._tt is not None:
            return self._tt.encode_ordinary(text)
        return self._engine.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._tt is not None:  # one thread: callers parallelise with processes
            enc = self._tt.encode_ordinary
            return [enc(t) for t in texts]
        return [e.ids for e in self._engine.encode_batch(list(texts), add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i < self._base]
        if self._tt is not None:  # invalid UTF-8 -> U+FFFD, as tokenizers' ByteLevel decoder
            return self._tt.decode(ids)
        return self._engine.decode(ids, skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._base + 3

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self._special)


class GPT2BPETokenizer(_ByteLevelBPE):
    """GPT-2's ``encoder.json`` + ``vocab.bpe`` (as released with the GPT-2 weights)."""

    kind = "gpt2_bpe"

    def __init__(self, encoder_json: str | Path, vocab_bpe: str | Path) -> None:
        self.encoder_json, self.vocab_bpe = Path(encoder_json), Path(vocab_bpe)
        try:
            vocab = json.loads(self.encoder_json.read_text(encoding="utf-8"))
            lines = self.vocab_bpe.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenizerError(f"{self.encoder_json.parent}: unreadable GPT-2 BPE files ({_first_line(exc)})") from None
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise TokenizerError(f"{self.encoder_json}: not a token -> id JSON object")
        pairs = [line.split(" ") for line in lines if line.strip() and not line.startswith("#version")]
        if any(len(p) != 2 for p in pairs):
            n = next(n for n, line in enumerate(lines, 1) if line.strip() and not line.startswith("#version")
                     and len(line.split(" ")) != 2)
            raise TokenizerError(f"{self.vocab_bpe}:{n}: expected two space-separated pieces")
        merges: list[tuple[str, str]] = list(map(tuple, pairs))  # type: ignore[arg-type]
        self._init_engine(vocab, merges, self.encoder_json.parent,
                          gpt2_ranks(vocab, merges, SPECIAL_TOKENS["eod"]))

    def files(self) -> list[Path]:
        return [self.encoder_json, self.vocab_bpe]


class TiktokenBPETokenizer(_ByteLevelBPE):
    """A tiktoken ranks file (GPT-2 ``r50k_base`` style) run with GPT-2's pre-tokenizer."""

    kind = "tiktoken"

    def __init__(self, ranks_file: str | Path) -> None:
        self.ranks_file = Path(ranks_file)
        ranks: dict[bytes, int] = {}
        try:
            with open(self.ranks_file, "rb") as f:
                for line in filter(bytes.strip, f):
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"{self.ranks_file}: not a tiktoken ranks file ({_first_line(exc)})") from None
        if not ranks:
            raise TokenizerError(f"{self.ranks_file}: empty tiktoken ranks file")
        byte_map = bytes_to_unicode()
        table = str.maketrans({chr(b): c for b, c in byte_map.items()})  # byte (as latin-1) -> GPT-2's char
        vocab = {tok.decode("latin-1").translate(table): r for tok, r in ranks.items()}

        def merges() -> list[tuple[str, str]]:
            return [("".join(byte_map[b] for b in a), "".join(byte_map[b] for b in b_))
                    for a, b_ in recover_merges(ranks)]

        self._init_engine(vocab, merges, self.ranks_file, ranks)  # the ranks *are* tiktoken's

    def files(self) -> list[Path]:
        return [self.ranks_file]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a directory or file.

    Accepts a directory written by ``train_tokenizer``/``Tokenizer.save`` (with
    ``gpt_dist_tokenizer.json``), a directory holding ``tokenizer.model``, or
    ``encoder.json`` + ``vocab.bpe``, or one ``*.tiktoken`` file, or such a file itself.
    Raises :class:`TokenizerError` naming the path when it cannot.
    """
    p = Path(path)
    if not p.exists():
        raise TokenizerError(f"{p}: no such tokenizer file or directory")
    if p.is_file():
        return SentencePieceTokenizer(p) if p.suffix == ".model" else TiktokenBPETokenizer(p)
    meta_path = p / META_FILE
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            kind, names = meta["kind"], meta["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TokenizerError(f"{meta_path}: unreadable tokenizer metadata ({_first_line(exc)})") from None
        tok = _from_kind(kind, [p / n for n in names], meta_path)
        if meta.get("fingerprint") not in (None, tok.fingerprint):
            raise TokenizerError(f"{p}: tokenizer files changed since they were saved "
                                 f"(fingerprint {tok.fingerprint[:12]} != recorded {str(meta['fingerprint'])[:12]})")
        return tok
    if (p / SP_MODEL).exists():
        return SentencePieceTokenizer(p / SP_MODEL)
    if (p / "encoder.json").exists() and (p / "vocab.bpe").exists():
        return GPT2BPETokenizer(p / "encoder.json", p / "vocab.bpe")
    ranks = sorted(p.glob("*.tiktoken"))
    if len(ranks) == 1:
        return TiktokenBPETokenizer(ranks[0])
    raise TokenizerError(f"{p}: not a tokenizer directory (expected {META_FILE}, {SP_MODEL}, "
                         "encoder.json + vocab.bpe, or one *.tiktoken file)")


def _from_kind(kind: str, files: list[Path], where: Path) -> Tokenizer:
    for f in files:
        if not f.is_file():
            raise TokenizerError(f"{f}: missing tokenizer file (listed in {where.name})")
    if kind == SentencePieceTokenizer.kind and len(files) == 1:
        return SentencePieceTokenizer(files[0])
    if kind == GPT2BPETokenizer.kind and len(files) == 2:
        return GPT2BPETokenizer(files[0], files[1])
    if kind == TiktokenBPETokenizer.kind and len(files) == 1:
        return TiktokenBPETokenizer(files[0])
    raise TokenizerError(f"{where}: unknown tokenizer kind {kind!r} with {len(files)} files")


def _sentence_chunks(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Cut documents at line ends into sentencepiece "sentences" of at most ``max_bytes``.

    sentencepiece skips longer sentences entirely; cutting at newlines keeps the
    newline characters in the training text so pieces such as ``.\\n`` can be learned.
    """
    for text in texts:
        buf: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if buf and size + n > max_bytes:
                yield "".join(buf)
                buf, size = [], 0
            if n > max_bytes:  # one very long line: hard cut (rare in prose)
                yield line.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
                continue
            buf.append(line)
            size += n
        if buf:
            yield "".join(buf)


def train_tokenizer(inputs: Sequence[str | Path], vocab_size: int, out_dir: str | Path, *,
                    text_key: str = "text", max_sentences: int = 2_000_000,
                    num_threads: int | None = None, verbose: bool = False) -> SentencePieceTokenizer:
    """Train a sentencepiece BPE tokenizer on JSONL/plain-text inputs and save it.

    ``inputs`` accepts what ``preprocess`` accepts (files, globs, directories, ``.gz``).
    ``vocab_size`` counts everything: 256 byte pieces, the 4 special tokens, ``<unk>``
    and the merges (GPT-1's 40,000 merges correspond to about 40,478). Tiny corpora get
    fewer pieces than asked (a soft limit) rather than an error.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    min_vocab = 256 + len(SPECIAL_TOKENS) + 2
    if vocab_size < min_vocab:
        raise TokenizerError(f"{out}: vocab_size {vocab_size} < {min_vocab} (256 bytes + specials)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TokenizerError(f"{out}: cannot create output directory ({exc.strerror})") from None
    max_bytes = 4096
    sentences = list(_sentence_chunks(iter_texts(inputs, text_key), max_bytes))
    if not sentences:
        raise TokenizerError(f"{', '.join(map(str, inputs))}: no text to train on")
    tmp = Path(tempfile.mkdtemp(prefix=".train_tokenizer.", dir=out))
    try:
        spm.set_random_generator_seed(1234)
        with open(os.devnull, "w") as devnull:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_prefix=str(tmp / "tokenizer"),
                model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                control_symbols=list(SPECIAL_TOKENS.values()), unk_id=0, bos_id=-1, eos_id=-1,
                pad_id=-1, character_coverage=0.9995, hard_vocab_limit=False,
                max_sentence_length=max_bytes + 16, input_sentence_size=max_sentences,
                shuffle_input_sentence=True, num_threads=num_threads or os.cpu_count() or 1,
                logstream=None if verbose else devnull)
        _normalize_trainer_spec(tmp / "tokenizer.model")
        os.replace(tmp / "tokenizer.model", out / SP_MODEL)
        os.replace(tmp / "tokenizer.vocab", out / "tokenizer.vocab")
    except RuntimeError as exc:
        raise TokenizerError(f"{out}: sentencepiece training failed ({_first_line(exc)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tok = SentencePieceTokenizer(out / SP_MODEL)
    tok.save(out)
    return tok


def _normalize_trainer_spec(model: Path) -> None:
    """Make the saved model a function of the training data and settings only.

    sentencepiece records its ``model_prefix`` (here a random temporary directory) and
    ``num_threads`` in the model file, so two identical trainings gave different bytes and
    hence different fingerprints. Neither field affects encoding; both are fixed here.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:  # pragma: no cover - protobuf missing: keep the file as written
        return
    proto = pb.ModelProto()
    proto.ParseFromString(model.read_bytes())
    proto.trainer_spec.model_prefix = "tokenizer"
    proto.trainer_spec.num_threads = 1
    model.write_bytes(proto.SerializeToString())


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
