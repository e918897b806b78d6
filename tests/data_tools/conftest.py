"""Session-scoped fixtures of the data-tools tests (built once, shared by every test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data_tools import dt_common as c


@pytest.fixture(scope="session")
def dt_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data_tools")


@pytest.fixture(scope="session")
def base_docs(dt_tmp: Path) -> list[str]:
    return c.make_base_docs(dt_tmp)


@pytest.fixture(scope="session")
def sp_dir(dt_tmp: Path, base_docs: list[str]) -> Path:
    return c.make_sp_dir(dt_tmp, base_docs)


@pytest.fixture(scope="session")
def sp_tok(sp_dir: Path):
    from gpt_dist.tokenizer import load_tokenizer

    return load_tokenizer(sp_dir)


@pytest.fixture(scope="session")
def multi_run(dt_tmp: Path, base_docs: list[str], sp_dir: Path) -> c.MultiRun:
    return c.make_multi_run(dt_tmp, base_docs, sp_dir)
