"""Invalid configs give one line naming the key (the cases tests/test_config.py and
tests/pipeline do not already cover: those have unknown keys, wrong types, heads % tp,
global batch vs micro x dp, layers % pp, pp with ZeRO-2/3, and the launcher on an unknown key).

Here: duplicate JSON keys, ``${env:...}`` of an undefined variable, invalid JSON, bad
``--set``, paths that do not exist, and ``launch/pretrain.py`` exiting 2 with one line when
the config only fails the checks inside ``pretrain`` (world size and paths).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gpt_dist.config import ConfigError, load_config, validate
from tests import helpers

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_cpu.json"
UNDEFINED = "GPT_DIST_TEST_SURELY_UNDEFINED_VAR"


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, msg
    return msg


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.json"
    p.write_text(text)
    return p


def _tiny(**edits) -> dict:
    raw = json.loads(TINY.read_text())
    for dotted, value in edits.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return raw


def test_duplicate_key(tmp_path):
    text = re.sub(r'("n_layer": \d+,)', r'\1 "n_layer": 7,', TINY.read_text(), count=1)
    assert text.count('"n_layer"') == 2
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, text))
    msg = _one_line(exc)
    assert "n_layer" in msg and "duplicate" in msg and "c.json" in msg


def test_undefined_env_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(UNDEFINED, raising=False)
    path = _write(tmp_path, json.dumps(_tiny(run__dir=f"${{env:{UNDEFINED}}}/runs")))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = _one_line(exc)
    assert "run.dir" in msg and UNDEFINED in msg and "not set" in msg
    monkeypatch.setenv(UNDEFINED, "/scratch")  # defined: substituted, never ''
    assert load_config(path).run.dir == "/scratch/runs"


def test_invalid_json_names_the_line(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, '{\n  "model": {"n_layer": 2,}\n}'))
    assert "c.json:2" in _one_line(exc)


@pytest.mark.parametrize("assignment,key", [("model.n_layr=3", "n_layr"), ("model.n_layer", "model.n_layer"),
                                            ("training.micro_batch_size=x", "micro_batch_size")])
def test_bad_set_override(assignment, key):
    with pytest.raises(ConfigError) as exc:
        load_config(TINY, [assignment])
    assert key in _one_line(exc)


@pytest.mark.parametrize("section,key,value", [
    ("data", "prefixes", ["/nonexistent/gpt_dist/shards"]),
    ("data", "tokenizer", "/nonexistent/gpt_dist/tokenizer"),
    ("checkpoint", "init_from", "/nonexistent/gpt_dist/export"),
])
def test_missing_path(tmp_path, section, key, value):
    shards = helpers.toy_shards(tmp_path / "shards", n_docs=1)
    tok = helpers.toy_tokenizer()
    raw = _tiny(data__prefixes=[str(shards)], data__tokenizer=str(tok))
    raw[section][key] = value
    cfg = load_config(_write(tmp_path, json.dumps(raw)))
    with pytest.raises(ConfigError) as exc:
        validate(cfg, 2)
    msg = _one_line(exc)
    assert f"{section}.{key}" in msg and "/nonexistent/gpt_dist/" in msg
    raw[section][key] = {"prefixes": [str(shards)], "tokenizer": str(tok), "init_from": None}[key]
    validate(load_config(_write(tmp_path, json.dumps(raw))), 2)  # the control: valid paths pass


def test_launcher_exits_2_with_one_line_on_a_validation_error(tmp_path):
    """A config that loads but fails validate() inside pretrain(): missing shards."""
    path = _write(tmp_path, json.dumps(_tiny(run__dir=str(tmp_path / "run"),
                                             data__prefixes=["/nonexistent/gpt_dist/shards"])))
    proc = helpers.run(helpers.python_cmd(ROOT / "launch" / "pretrain.py", "--config", path), timeout=180)
    assert proc.rc == 2, proc.stderr[-3000:]
    lines = [line for line in proc.output.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("pretrain: config error: data.prefixes[0]"), lines
    assert not (tmp_path / "run").exists()  # nothing written before the config is known good
