"""T11, index cache: megatron-core's sample-index caches (.npy) are published whole or not at
all, keyed by shard content and settings, and never unpickled.

megatron-core writes them in place and loads them with ``allow_pickle=True``;
``gpt_dist.training.data`` builds into a private directory, renames it into place, and checks
every cached file's header before megatron-core may load it.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gpt_dist.config import load_config
from gpt_dist.training.data import IndexCacheError, build_datasets
from tests.helpers import toy_fingerprint  # the toy tokenizer, which wrote the toy shards
from tests.reliability import harness as h

#: a single-process stand-in for ParallelContext (rank 0 of 1): what build_datasets uses
SOLO = SimpleNamespace(rank=0, world_size=1, broadcast_object=lambda obj: obj, barrier=lambda: None)


def _config(tmp: Path, data: Path, run: str = "run") -> object:
    path = h.make_config(tmp / f"{run}.json", tmp / run, data)
    return load_config(path)


def _sections(cfg) -> tuple:
    """The config sections ``build_datasets`` takes: data, model, training, run directory."""
    return cfg.data, cfg.model, cfg.training, cfg.run_dir


def _first_samples(ds, n: int = 6) -> list[list[int]]:
    return [ds[i]["tokens"].tolist() for i in range(n)]


def _build(cfg) -> tuple[list[list[int]], list[Path]]:
    d = build_datasets(*_sections(cfg), SOLO, h.VOCAB, h.EOD, toy_fingerprint())
    cache_root = cfg.run_dir / "data_cache"
    return _first_samples(d.train), sorted(p for p in cache_root.iterdir())


@pytest.fixture()
def toy(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path, h.build_shards(tmp_path / "data" / "toy", n_docs=120)


def test_cache_published_whole_then_reused(toy) -> None:
    tmp, data = toy
    cfg = _config(tmp, data)
    first, dirs = _build(cfg)
    assert len(dirs) == 1 and ".building-" not in dirs[0].name, dirs  # renamed into place
    files = {f.name: f.stat().st_mtime_ns for f in dirs[0].glob("*.npy")}
    assert files, "megatron-core wrote no index files"
    again, dirs2 = _build(cfg)
    assert again == first and dirs2 == dirs
    assert {f.name: f.stat().st_mtime_ns for f in dirs[0].glob("*.npy")} == files  # loaded, not rebuilt


class _Plant:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("damage", ["pickle", "truncate", "float"])
def test_damaged_or_pickled_cache_refused_before_loading(toy, damage: str) -> None:
    tmp, data = toy
    cfg = _config(tmp, data)
    _build(cfg)
    cache = next((cfg.run_dir / "data_cache").iterdir())
    target = min(cache.glob("*.npy"))
    marker = tmp / "code-ran"
    if damage == "pickle":
        arr = np.empty(1, dtype=object)
        arr[0] = _Plant(str(marker))
        with open(target, "wb") as f:
            np.save(f, arr, allow_pickle=True)
        assert pickle.loads(pickle.dumps(_Plant(str(tmp / "probe")))) is None and (tmp / "probe").exists()
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-3])
    else:
        np.save(target, np.zeros(4, dtype=np.float32))
    with pytest.raises(IndexCacheError, match=target.name) as err:
        _build(cfg)
    assert str(cache) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists(), "the planted object was unpickled"


def test_leftover_building_dir_of_a_crash_is_never_read(toy) -> None:
    tmp, data = toy
    cfg = _config(tmp, data)
    first, dirs = _build(cfg)
    final = dirs[0]
    # what a crash mid-build leaves: a half-written private directory, no final one
    crashed = final.with_name(final.name + ".building-deadbeef0000")
    final.rename(crashed)
    for f in crashed.glob("*.npy"):
        f.write_bytes(f.read_bytes()[:20])
    again, dirs2 = _build(cfg)
    assert again == first
    assert final in dirs2 and all(f.stat().st_size > 20 for f in final.glob("*.npy"))


def test_edited_shard_gets_a_fresh_cache(toy) -> None:
    tmp, data = toy
    cfg = _config(tmp, data)
    first, _ = _build(cfg)
    h.build_shards(data, n_docs=120, seed=7)  # same prefix, other documents
    again, dirs2 = _build(cfg)
    assert len(dirs2) == 2 and again != first


def _build_in_child(cfg_path: str, out: mp.Queue) -> None:
    cfg = load_config(cfg_path)
    out.put(_first_samples(build_datasets(*_sections(cfg), SOLO, h.VOCAB, h.EOD, toy_fingerprint()).train))


def test_two_jobs_building_the_same_cache_at_once(toy) -> None:
    """Two processes that share a cache directory (two jobs, or two nodes' rank 0 each
    thinking it builds) both succeed, read the same samples, and leave one whole cache."""
    tmp, data = toy
    path = h.make_config(tmp / "shared.json", tmp / "shared", data)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(path), out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    dirs = sorted((tmp / "shared" / "data_cache").iterdir())
    assert len(dirs) == 1 and ".building-" not in dirs[0].name, dirs
    assert _first_samples(build_datasets(*_sections(load_config(path)), SOLO, h.VOCAB, h.EOD, toy_fingerprint()).train) == results[0]
