"""The test support keeps its one-way rules (issue 18): ranks of in-process multi-rank tests
start through ``helpers.run_ranks`` only, no test stubs the trainer's tokenizer loading
(the toy tokenizer is real), and test support lives in tests/, not in the package.

Each rule is checked in the sources, so a new test that starts ranks its own way fails here
with the file and line; and the toy tokenizer is checked against the toy shards it wrote.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

#: ways to start processes that run ranks, other than helpers.run_ranks (and the launchers)
OTHER_RANK_STARTS = re.compile(r"start_processes\(|mp\.spawn\(|\.spawn\(worker|get_context\(\"fork\"\)"
                               r"|\bos\.fork\(")


def _sources() -> list[Path]:
    files = sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)
    assert len(files) > 50, f"only {len(files)} test files: wrong root {ROOT}?"
    return files


def test_ranks_start_only_through_run_ranks():
    hits = []
    for path in _sources():
        if path == TESTS / "helpers.py" or path == Path(__file__).resolve():
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if OTHER_RANK_STARTS.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()}")
    assert hits == [], "start ranks with tests/helpers.py run_ranks:\n" + "\n".join(hits)


def test_no_test_stubs_the_tokenizer_loading():
    hits = [f"{p.relative_to(ROOT)}:{no}: {line.strip()}" for p in _sources() if p != Path(__file__).resolve()
            for no, line in enumerate(p.read_text().splitlines(), 1) if "load_tokenizer_info =" in line]
    assert hits == [], "point data.tokenizer at helpers.toy_tokenizer() instead:\n" + "\n".join(hits)


def test_no_test_support_in_the_package():
    assert not (ROOT / "gpt_dist" / "data" / "testing.py").exists()
    hits = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "gpt_dist").rglob("*.py"))
            if "from tests" in p.read_text() or "import tests" in p.read_text()]
    assert hits == [], hits


def test_toy_tokenizer_wrote_the_toy_shards(tmp_path):
    """The toy tokenizer has the toy shards' vocabulary (500, end of document 499), and the
    trainer's data checks accept the shards with it: same fingerprint, largest id 499."""
    from gpt_dist.data.shardset import check_tokenizer, check_vocab, resolve
    from gpt_dist.tokenizer import load_tokenizer

    tok = load_tokenizer(helpers.toy_tokenizer())
    assert (tok.vocab_size, tok.eod_id) == (helpers.VOCAB, helpers.EOD)
    assert sorted(tok.special_ids.values()) == [496, 497, 498, 499]
    text = "Return the sum of a and b.\n"
    assert tok.decode(tok.encode(text)) == text and max(tok.encode(text)) < 496
    shards = resolve(str(helpers.toy_shards(tmp_path / "toy", n_docs=20)))
    assert shards.tokenizer_fingerprint == tok.fingerprint and shards.max_token_ids == [helpers.EOD]
    check_tokenizer([shards], tok.fingerprint, "toy")
    check_vocab([shards], helpers.VOCAB)


def test_toy_config_is_tiny_cpu_with_the_overrides():
    import json

    tiny = json.loads(helpers.TINY_CPU.read_text())
    cfg = helpers.toy_config_dict("R", ["P"], model={"n_layer": 2},
                                  deepspeed={"zero_optimization": {"reduce_bucket_size": 7}})
    assert cfg["model"] == {**tiny["model"], "n_layer": 2}
    assert cfg["deepspeed"]["zero_optimization"] == {**tiny["deepspeed"]["zero_optimization"], "reduce_bucket_size": 7}
    assert (cfg["run"]["dir"], cfg["data"]["prefixes"], cfg["data"]["tokenizer"]) == \
        ("R", ["P"], str(helpers.toy_tokenizer()))
    assert {k: v for k, v in cfg.items() if k not in ("model", "deepspeed", "run", "data")} == \
        {k: v for k, v in tiny.items() if k not in ("model", "deepspeed", "run", "data")}


def _write_env(rank: int, out: str) -> None:
    import os

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    Path(out, f"rank{rank}").write_text(" ".join(os.environ[k] for k in keys) + f" {os.getpid()}")


def _fail_on_rank_1(rank: int) -> None:
    import time

    if rank == 1:
        raise ValueError("planted failure")
    time.sleep(60)  # the peer that would wait in a collective: stopped, not waited for


def _hang(rank: int, out: str) -> None:
    import os
    import time

    Path(out, f"pid{rank}").write_text(str(os.getpid()))
    time.sleep(300)


def test_run_ranks_environment_failure_and_timeout(tmp_path):
    import time

    import pytest

    helpers.run_ranks(_write_env, 3, str(tmp_path), timeout=60)
    rows = [(tmp_path / f"rank{r}").read_text().split() for r in range(3)]
    assert [row[:3] for row in rows] == [[str(r), "3", str(r)] for r in range(3)]
    assert len({row[4] for row in rows}) == 1 and int(rows[0][4]) > 0  # one rendezvous port
    assert len({row[5] for row in rows}) == 3  # three processes

    t0 = time.monotonic()
    with pytest.raises(helpers.RankFailed, match=r"(?s)rank 1 of 2 raised.*planted failure"):
        helpers.run_ranks(_fail_on_rank_1, 2, timeout=60)
    assert time.monotonic() - t0 < 30  # rank 0 was stopped, not waited for

    with pytest.raises(helpers.RankFailed, match=r"ranks \[0, 1\] of 2 still running after 2s"):
        helpers.run_ranks(_hang, 2, str(tmp_path), timeout=2)
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(2)]
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids), pids  # no survivor
