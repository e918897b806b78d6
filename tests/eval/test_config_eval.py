"""``launch/evaluate.py``'s options are the config's ``eval`` section: ``--config FILE``, the short
flags (aliases of its keys) and ``--set eval.KEY=VALUE``; a bad one is one line naming the key."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import pytest

from gpt_dist.config import Config, ConfigError, EvalConfig, load_config
from gpt_dist.eval import driver
from gpt_dist.eval.driver import parse_args
from tests import helpers

TINY = helpers.ROOT / "configs" / "tiny_cpu.json"
REQUIRED = ["--model", "exports/m", "--tasks", "lambada,wikitext"]

#: a value for every short flag that differs from the key's default, as (flag value, parsed value)
FLAG_VALUES = {
    "model": ("runs/r", "runs/r"), "tasks": ("mc:a.jsonl,lambada", "mc:a.jsonl,lambada"),
    "data_dir": ("evals", "evals"), "out": ("r.json", "r.json"), "tokenizer": ("tok", "tok"),
    "tp": ("2", 2), "pp": ("4", 4), "batch_size": ("3", 3), "device": ("cpu", "cpu"),
    "dtype": ("bf16", "bf16"), "limit": ("5", 5), "rolling_context": ("7", 7),
    "bootstrap_iters": ("0", 0), "sweep_dir": ("sw", "sw"), "overlap_n": ("13", 13),
    "overlap_threshold": ("0.5", 0.5), "overlap_cache": ("bloom", "bloom"),
    "overlap_fp_rate": ("0.01", 0.01), "harness": ("lm-eval", "lm-eval"), "include_path": ("yamls", "yamls"),
}


def _main(*argv: str) -> tuple[int, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = driver.main(list(argv))
    return rc, [line for line in err.getvalue().splitlines() if line.strip()]


def test_every_flag_is_an_alias_of_its_eval_key() -> None:
    keys = {f.name for f in dataclasses.fields(EvalConfig)}
    flagged = {k for _, k, _ in driver._VALUE_FLAGS} | {k for _, k, _, _ in driver._SWITCHES} | {"overlap_with"}
    assert flagged == keys, keys ^ flagged          # every key has a flag and every flag a key
    assert set(FLAG_VALUES) == {k for _, k, _ in driver._VALUE_FLAGS}
    defaults = dataclasses.asdict(EvalConfig(model="m", tasks="t"))
    argv = [*REQUIRED]
    for flag, key, _ in driver._VALUE_FLAGS:
        argv += [flag, FLAG_VALUES[key][0]]
    for flag, key, value, _ in driver._SWITCHES:
        assert defaults[key] != value
        argv.append(flag)
    argv += ["--overlap-with", "shards/a", "--overlap-with", "shards/b"]
    ev = parse_args(argv)
    for key, (_, want) in FLAG_VALUES.items():
        assert getattr(ev, key) == want and want != defaults[key], key
    assert (ev.reuse_context, ev.progress, ev.all_checkpoints, ev.per_example) == (False, False, True, True)
    assert ev.overlap_with == ["shards/a", "shards/b"]
    assert isinstance(ev.overlap_threshold, float) and isinstance(ev.tp, int)


def test_unset_flags_keep_the_defaults_and_the_launcher_rank_is_ignored() -> None:
    ev = parse_args([*REQUIRED, "--local_rank=1"])
    assert ev == EvalConfig(model="exports/m", tasks="lambada,wikitext")


def test_config_file_then_flags_then_set(tmp_path: Path) -> None:
    path = tmp_path / "eval.json"   # an evaluation config may hold only the eval section
    path.write_text(json.dumps({"eval": {"model": "exports/a", "tasks": "lambada", "tp": 2, "batch_size": 4,
                                         "overlap_with": ["p"]}}))
    ev = parse_args(["--config", str(path)])
    assert (ev.model, ev.tasks, ev.tp, ev.batch_size, ev.overlap_with) == ("exports/a", "lambada", 2, 4, ["p"])
    ev = parse_args(["--config", str(path), "--tp", "1", "--model", "exports/b"])
    assert (ev.model, ev.tp, ev.batch_size) == ("exports/b", 1, 4)
    ev = parse_args(["--config", str(path), "--tp", "1", "--set", "eval.tp=4", "eval.tasks=wikitext,hellaswag",
                     "--set", "eval.reuse_context=false"])
    assert (ev.tp, ev.tasks, ev.reuse_context) == (4, "wikitext,hellaswag", False)


def test_set_alone_gives_the_section() -> None:
    ev = parse_args(["--set", "eval.model=runs/r", "eval.tasks=lambada", "eval.pp=2", "eval.dtype=bf16"])
    assert (ev.model, ev.tasks, ev.pp, ev.dtype) == ("runs/r", "lambada", 2, "bf16")


def test_a_run_config_takes_an_eval_section_and_training_is_unaffected(tmp_path: Path) -> None:
    assert load_config(TINY).eval is None
    assert "eval" in Config().to_dict()
    ev = parse_args(["--config", str(TINY), *REQUIRED, "--pp", "2"])
    assert (ev.model, ev.pp) == ("exports/m", 2)
    raw = json.loads(TINY.read_text())
    raw["eval"] = None                      # as a dumped training config has it
    (tmp_path / "c.json").write_text(json.dumps(raw))
    assert parse_args(["--config", str(tmp_path / "c.json"), *REQUIRED]).model == "exports/m"


@pytest.mark.parametrize("argv,needle", [
    (["--set", "eval.batch_sze=4"], "eval.batch_sze: unknown key (did you mean 'batch_size'?)"),
    (["--batch-size", "0"], "eval.batch_size: must be >= 1, got 0"),
    (["--tp", "two"], "eval.tp: expected an integer, got 'two'"),
    (["--device", "gpu"], "eval.device: must be one of ['auto', 'cpu', 'cuda'], got 'gpu'"),
    (["--overlap-fp-rate", "2"], "eval.overlap_fp_rate: must be in (0, 1), got 2"),
    (["--set", "eval.limit=0"], "eval.limit: must be >= 1, got 0"),
])
def test_bad_eval_value_is_one_line_naming_the_key(argv: list[str], needle: str) -> None:
    rc, lines = _main(*REQUIRED, *argv)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("evaluate: config error: ") and needle in lines[0], lines


@pytest.mark.parametrize("argv,key", [(["--tasks", "lambada"], "eval.model"), (["--model", "m"], "eval.tasks")])
def test_missing_model_or_tasks_names_the_key(argv: list[str], key: str) -> None:
    rc, lines = _main(*argv)
    assert rc == 2 and len(lines) == 1 and f"{key}: required" in lines[0], lines


def test_bad_key_in_the_config_file_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"eval": {"model": "m", "tasks": "t", "tpp": 2}}))
    rc, lines = _main("--config", str(path))
    assert rc == 2 and len(lines) == 1 and f"{path}: eval.tpp: unknown key" in lines[0], lines
    with pytest.raises(ConfigError, match=r"eval\.tpp: unknown key"):
        parse_args(["--config", str(path)])


def test_launcher_bad_eval_key_exits_2_with_one_line() -> None:
    r = helpers.run(helpers.python_cmd(helpers.ROOT / "launch" / "evaluate.py", *REQUIRED,
                                       "--set", "eval.nosuch=1"), timeout=120)
    lines = [line for line in (r.stderr + r.stdout).splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "eval.nosuch: unknown key" in lines[0], lines
