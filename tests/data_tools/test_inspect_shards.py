"""data_tools/inspect_shards.py: clean shards pass, every corruption exits non-zero."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt_dist.data import indexed
from tests.data_tools import dt_common as c


@pytest.fixture(scope="module")
def cli():
    import data_tools.inspect_shards as cli

    return cli


def test_clean_shards(cli, multi_run, capsys) -> None:
    assert cli.main([multi_run.prefix, "--num-docs", "2"]) == 0
    out = capsys.readouterr().out
    n = len(indexed.list_shards(multi_run.prefix))
    assert f"{n} shard(s) OK" in out
    total = multi_run.manifest["counts"]
    assert f"{total['documents']:>10,} {total['tokens']:>12,}" in out  # the totals row
    assert "document 0" in out and "document 1" in out
    assert multi_run.expected[0][:60] in out  # decoded with the manifest's tokenizer
    # one shard prefix alone
    assert cli.main([indexed.shard_prefix(multi_run.prefix, 1), "--num-docs", "0"]) == 0


CORRUPTIONS = ["truncate_bin", "swap_bin", "bad_magic", "truncate_idx", "dtype_float", "doc_idx_decreasing",
               "edit_length", "edit_token"]


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_each_corruption_exits_non_zero(cli, multi_run, dt_tmp: Path, case: str, capsys) -> None:
    p = c.copy_shards(multi_run.prefix, dt_tmp / f"inspect_{case}")
    shards = sorted(indexed.list_shards(p), key=lambda s: Path(s + ".bin").stat().st_size)
    target = shards[0]
    c.mutate(target, case, other=shards[-1])
    assert cli.main([p, "--num-docs", "1"]) == 1
    err = capsys.readouterr().err
    assert "CORRUPT" in err and Path(target).name in err, err
    check = c.MUTATION_CHECKS.get(case, "sha256")
    assert f"check: {check}" in err, err


def test_missing_shard_and_manifest_mismatch(cli, multi_run, dt_tmp: Path, capsys) -> None:
    p = c.copy_shards(multi_run.prefix, dt_tmp / "inspect_missing")
    last = indexed.list_shards(p)[-1]
    for suffix in (".bin", ".idx", ".meta.json"):
        Path(last + suffix).unlink()
    assert cli.main([p]) == 1
    assert "shards vs manifest" in capsys.readouterr().err
    q = c.copy_shards(multi_run.prefix, dt_tmp / "inspect_middle")
    for suffix in (".bin", ".idx", ".meta.json"):
        Path(indexed.shard_prefix(q, 1) + suffix).unlink()
    assert cli.main([q]) == 1
    assert "shards contiguous" in capsys.readouterr().err


def test_cli_subprocess_exit_codes(multi_run, dt_tmp: Path) -> None:
    """As a command: a corrupt shard exits 1 with one CORRUPT line and no traceback."""
    p = c.copy_shards(multi_run.prefix, dt_tmp / "inspect_cli")
    c.mutate(indexed.list_shards(p)[0], "truncate_bin")
    r = c.run_cli("inspect_shards.py", p, "--num-docs", "0", timeout=60)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "check: bin size" in r.stderr
    r = c.run_cli("inspect_shards.py", str(dt_tmp / "no_such_prefix"), timeout=60)
    assert r.returncode == 1 and "no_such_prefix" in r.stderr and "Traceback" not in r.stderr
