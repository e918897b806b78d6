"""Loading a run config: JSON -> ``--set`` overrides -> ``${env:VAR}`` -> typed, checked tree.

Loading rejects unknown keys, wrong types, duplicate keys and undefined ``${env:VAR}``
references with one line that names the key (RELIABILITY.md T12).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from gpt_dist.config.errors import ConfigError
from gpt_dist.config.tree import Config
from gpt_dist.utils import atomic_write_text

_ENV_RE = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"{key}: duplicate key in the JSON object")
        out[key] = value
    return out


def _interpolate(value: Any, where: str) -> Any:
    """Replace ``${env:VAR}`` in strings; an undefined variable is an error, never ''."""
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in os.environ:
                raise ConfigError(f"{where}: environment variable {m.group(1)} is not set")
            return os.environ[m.group(1)]
        return _ENV_RE.sub(sub, value)
    if isinstance(value, list):
        return [_interpolate(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{where}.{k}") for k, v in value.items()}
    return value


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {type(value).__name__}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = [n for n in names if n.startswith(key[:3])]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}.{key}: unknown key{hint}".lstrip("."))
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}".lstrip(".")) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, _interpolate(data, ""), "")


def parse_value(raw: str) -> Any:
    """A command-line value: JSON, then a Python literal, else the string itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw
    return raw if isinstance(value, tuple) else value  # data.split=90,10,0 is a string, not a tuple


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``section.key=value`` (value parsed by ``parse_value``)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected section.key=value")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    value = parse_value(raw)
    node = data
    for i, key in enumerate(keys[:-1]):
        if keys[0] == "deepspeed" or key in node or i == 0:
            node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {path}: {'.'.join(keys[: i + 1])} is not a section")
    node[keys[-1]] = value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The JSON object of a config file (duplicate keys refused), not yet checked."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None, *,
                values: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read a JSON config, apply ``--set`` overrides, and check types and local rules.

    ``path`` None starts from the defaults. ``values`` (section -> key -> value) is set on
    top of the file before the overrides: ``launch/evaluate.py``'s short flags, which are
    aliases of ``--set eval.KEY=VALUE``."""
    data = read_config_file(path) if path is not None else {}
    for section, items in (values or {}).items():
        if data.get(section) is None:  # absent, or null in a dumped config
            data[section] = {}
        node = data[section]
        if not isinstance(node, dict):
            raise ConfigError(f"{section}: expected an object, got {type(node).__name__}")
        node.update(items)
    for item in overrides or []:
        apply_override(data, item)
    where = f"{path}: " if path is not None else ""
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    except TypeError as exc:  # a missing required field in a dataclass
        raise ConfigError(f"{where}{exc}") from None


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (tmp + fsync + rename)."""
    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2, sort_keys=False) + "\n")
