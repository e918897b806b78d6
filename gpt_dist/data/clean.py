"""Parsing, cleaning and quality filtering of one document (runs in worker processes).

Why each step:

* **Parsing** turns a raw line into text or a *reject* with a reason (malformed JSON,
  missing key, invalid UTF-8, non-string text, empty text). Rejects are bad input: they
  are listed with file and line in the rejects file, and ``--strict`` stops on them.
* **Cleaning** makes equal-looking text byte-equal so exact deduplication works and the
  tokenizer sees one spelling: lone surrogates (legal in JSON, illegal in UTF-8) become
  U+FFFD, CRLF/CR become LF, Unicode is NFC-normalized, control characters are removed,
  trailing spaces and runs of blank lines are trimmed. Indentation is kept (code).
* **Quality filters** drop documents that are valid but unwanted (too short/long, mostly
  non-alphabetic, mostly repeated lines, the Gopher/C4 heuristics). Each has a counter.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import asdict, dataclass

SURROGATES = re.compile("[\ud800-\udfff]")
# C0/C1 controls except TAB and LF, DEL, BOM/ZWNBSP and the two non-characters
CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\ufffe\uffff]")
UNICODE_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
UNICODE_NEWLINES = re.compile("[\u0085\u2028\u2029]")
_ASCII_CONTROLS = bytes(b for b in range(128) if b < 32 and b not in (9, 10) or b == 127)
_ASCII_NON_LETTERS = bytes(b for b in range(128) if not chr(b).isalpha())
BLANK_RUNS = re.compile(r"\n{3,}")
NOT_ASCII_RUNS = re.compile("[\x00-\x7f]+")

FILTERS = ("too_short", "too_long", "low_alpha", "repeated_lines")


@dataclass(frozen=True)
class CleanConfig:
    """Parsing, cleaning and filter settings (recorded in the manifest)."""

    text_key: str = "text"
    unicode_form: str = "NFC"  # NFC | NFKC | none
    min_chars: int = 64
    max_chars: int = 100_000
    min_alpha: float = 0.4  # letters / non-space characters
    max_repeated_lines: float = 0.35  # share of non-blank lines that repeat an earlier one

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Cleaned:
    """Result of cleaning: the text and what was changed."""

    text: str
    surrogates: int
    controls: int


def parse_record(data: bytes, kind: str, text_key: str) -> tuple[str | None, str, str]:
    """``(text, "", "")`` or ``(None, code, message)`` for one raw JSONL line or text file.

    Codes (counted in the manifest): invalid_utf8, malformed_json, not_object,
    missing_key, not_string.
    """
    try:
        s = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, "invalid_utf8", f"invalid UTF-8 at byte {exc.start}"
    if kind == "text":
        return s, "", ""
    try:
        # strict=False: raw control characters inside strings are cleaned, not fatal
        obj = json.loads(s, strict=False)
    except json.JSONDecodeError as exc:
        return None, "malformed_json", f"malformed JSON ({exc.msg} at column {exc.colno})"
    except (ValueError, RecursionError) as exc:
        return None, "malformed_json", f"malformed JSON ({type(exc).__name__})"
    if not isinstance(obj, dict):
        return None, "not_object", f"not a JSON object ({type(obj).__name__})"
    if text_key not in obj:
        return None, "missing_key", f"missing key {text_key!r}"
    value = obj[text_key]
    if not isinstance(value, str):
        return None, "not_string", f"{text_key!r} is {type(value).__name__}, not a string"
    return value, "", ""


def clean_text(text: str, unicode_form: str = "NFC") -> Cleaned:
    """Normalize one document (see the module docstring); pure and deterministic.

    ASCII text (most of an English corpus) takes byte-level fast paths: the regular
    expressions below cost more than tokenizing would.
    """
    surrogates = controls = 0
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():
        raw = text.encode("ascii")
        kept = raw.translate(None, _ASCII_CONTROLS)
        if len(kept) != len(raw):
            controls = len(raw) - len(kept)
            text = kept.decode("ascii")
    else:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text, surrogates = SURROGATES.subn("\ufffd", text)
        if unicode_form != "none":
            text = unicodedata.normalize(unicode_form, text)
        text = UNICODE_SPACES.sub(" ", text)
        text = UNICODE_NEWLINES.sub("\n", text)
        text, controls = CONTROLS.subn("", text)
    if " \n" in text or "\t\n" in text:
        text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
    if "\n\n\n" in text:
        text = BLANK_RUNS.sub("\n\n", text)
    return Cleaned(text.strip(), surrogates, controls)


def _letters(text: str) -> int:
    """Alphabetic characters: ASCII ones by a byte translation, the (few) others by str.isalpha."""
    ascii_part = text.encode("ascii", "ignore")
    letters = len(ascii_part.translate(None, _ASCII_NON_LETTERS))
    if len(ascii_part) != len(text):
        letters += sum(map(str.isalpha, NOT_ASCII_RUNS.sub("", text)))
    return letters


def filter_reason(text: str, cfg: CleanConfig) -> str | None:
    """The first quality filter ``text`` fails, or None when it passes all."""
    n = len(text)
    if n < cfg.min_chars:
        return "too_short"
    if cfg.max_chars and n > cfg.max_chars:
        return "too_long"
    if cfg.min_alpha > 0:
        # after cleaning, the only whitespace left is space, tab and newline
        if text.isascii():  # one byte pass each instead of three str.count passes
            raw = text.encode("ascii")
            visible = len(raw.translate(None, b" \n\t"))
            letters = len(raw.translate(None, _ASCII_NON_LETTERS))
        else:
            visible = n - text.count(" ") - text.count("\n") - text.count("\t")
            letters = _letters(text)
        if visible and letters / visible < cfg.min_alpha:
            return "low_alpha"
    if cfg.max_repeated_lines < 1:
        lines = text.split("\n")
        distinct = set(lines)
        blank = "" in distinct
        n_lines = len(lines) - lines.count("")
        if n_lines >= 4 and 1 - (len(distinct) - blank) / n_lines > cfg.max_repeated_lines:
            return "repeated_lines"
    return None
