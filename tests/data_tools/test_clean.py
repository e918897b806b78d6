"""Parsing, cleaning and each quality filter (gpt_dist.data.clean), unit level."""

from __future__ import annotations

import json

import pytest

from gpt_dist.data.clean import CleanConfig, clean_text, filter_reason, parse_record

PROSE = ("The quick brown fox jumps over the lazy dog while the cat watches from the window. "
         "Nothing else happens in this small and quiet story about animals.")


@pytest.mark.parametrize(("data", "kind", "code"), [
    (b'{"text": "ok"}', "jsonl", ""),
    (b'{"text": "unterminated', "jsonl", "malformed_json"),
    (b'[1, 2]', "jsonl", "not_object"),
    (b'{"body": "x"}', "jsonl", "missing_key"),
    (b'{"text": 42}', "jsonl", "not_string"),
    (b'{"text": null}', "jsonl", "not_string"),
    (b'{"text": "\xff\xfe"}', "jsonl", "invalid_utf8"),
    (b"plain \xc3 text", "text", "invalid_utf8"),
    (b"plain text file", "text", ""),
])
def test_parse_record_codes(data: bytes, kind: str, code: str) -> None:
    text, got, message = parse_record(data, kind, "text")
    assert got == code
    assert (text is None) == bool(code)
    if code:
        assert message


def test_parse_record_custom_key_and_raw_control_chars() -> None:
    text, code, _ = parse_record(b'{"body": "a\tb\x00c"}', "jsonl", "body")
    assert code == "" and text == "a\tb\x00c"


def test_clean_crlf_controls_whitespace_and_surrogates() -> None:
    raw = "Title\r\nline one  \r\nline\x00 two\x07\rline three\t\n\n\n\n\nend\ufeff"
    c = clean_text(raw)
    assert c.text == "Title\nline one\nline two\nline three\n\nend"
    assert c.controls == 3  # NUL, BEL, BOM
    assert c.surrogates == 0
    s = clean_text("caf\u00e9 \ud800 x")
    assert s.text == "caf\u00e9 \ufffd x" and s.surrogates == 1
    s.text.encode("utf-8")  # must be encodable now


def test_clean_unicode_normalization() -> None:
    decomposed = "cafe\u0301 na\u0308ive \ufb01le"  # e + combining acute, a + diaeresis, fi ligature
    assert clean_text(decomposed).text == "caf\u00e9 n\u00e4ive \ufb01le"  # NFC keeps the ligature
    assert clean_text(decomposed, "NFKC").text == "caf\u00e9 n\u00e4ive file"
    assert clean_text(decomposed, "none").text == decomposed
    # exotic spaces and line separators become plain ones; C1 controls go
    assert clean_text("a\u00a0b\u3000c\u2028d\x85e\x9f").text == "a b c\nd\ne"


def test_clean_keeps_indentation_and_is_idempotent() -> None:
    code = "def f():\n    return 1\n\n\tx = 2"
    assert clean_text(code).text == code
    once = clean_text("  x \r\n\n\n\n y\x01 ").text
    assert clean_text(once).text == once


def test_each_filter_drops_what_it_should() -> None:
    cfg = CleanConfig(min_chars=64, max_chars=1000, min_alpha=0.4, max_repeated_lines=0.35)
    assert filter_reason(PROSE, cfg) is None
    assert filter_reason(PROSE[:63], cfg) == "too_short"
    assert filter_reason(PROSE[:64], cfg) is None
    assert filter_reason((PROSE + " ") * 8, cfg) == "too_long"
    digits = "1234 5678 " * 20
    assert filter_reason(digits, cfg) == "low_alpha"
    # 40% letters exactly passes, just below fails (letters / non-space characters)
    assert filter_reason("abcd123456 " * 10, cfg) is None
    assert filter_reason("abc1234567 " * 10, cfg) == "low_alpha"
    repeated = "\n".join(["the same spam line again"] * 5 + ["a different line", "another one"])
    assert filter_reason(repeated, cfg) == "repeated_lines"
    varied = "\n".join(f"line number {w} of a text" for w in ("one", "two", "three", "four", "five"))
    assert filter_reason(varied + "\n" + "line number one of a text", cfg) is None  # 1/6 repeated
    # every filter can be switched off
    off = CleanConfig(min_chars=0, max_chars=0, min_alpha=0, max_repeated_lines=1)
    for text in (PROSE[:10], (PROSE + " ") * 8, digits, repeated):
        assert filter_reason(text, off) is None


def test_filter_counts_in_a_pipeline_manifest(multi_run) -> None:
    """Each planted failure of the multi-input run is counted under its filter."""
    m = multi_run.manifest
    for name in ("too_short", "too_long", "low_alpha", "repeated_lines"):
        assert m["counts"]["filtered"][name] == multi_run.planted[name], (name, m["counts"]["filtered"])
    assert m["counts"]["rejected"] == {}
    assert m["settings"]["clean"] == json.loads(json.dumps(CleanConfig().to_dict()))
