"""Training refuses data it would silently misread (gpt_dist.training.data.check_data).

Real shards, written by the real pipeline with a real tokenizer (and its manifest), then
damaged one way per test: a shard deleted from the middle or the end of the set, a shard
on disk the manifest does not list, a shard swapped for another run's, another tokenizer
configured, a model vocabulary smaller than the shards' ids. Each check is a unit test of
``check_data``/``resolve`` in this process; one end-to-end launch of ``launch/pretrain.py``
shows the exit code and the single line. Prefixes without a manifest (plain Megatron
shards) still resolve, with a one-line warning, and are scanned for their largest id.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gpt_dist.config import load_config
from gpt_dist.data import indexed
from gpt_dist.data.shardset import DataCheckError, resolve
from gpt_dist.training.data import build_datasets, check_data
from tests import helpers

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Shards (several, with manifest) written with tokenizer A; a second tokenizer B."""
    from gpt_dist.tokenizer import load_tokenizer, train_tokenizer
    from tests.toy_data import build_tiny_corpus_and_shards

    work = tmp_path_factory.mktemp("data_checks")
    prefix, tok_a = build_tiny_corpus_and_shards(work, n_docs=120, vocab_size=512, shard_tokens=12_000)
    tok_b = work / "tokenizer_b"
    train_tokenizer([work / "corpus.jsonl"], 400, tok_b, num_threads=1)
    a, b = load_tokenizer(tok_a), load_tokenizer(tok_b)
    assert a.fingerprint != b.fingerprint
    n = len(json.loads(Path(prefix + ".manifest.json").read_text())["shards"])
    assert n >= 3, n  # a middle shard exists
    return SimpleNamespace(work=work, prefix=prefix, tok_a=tok_a, tok_b=str(tok_b), fp_a=a.fingerprint,
                           fp_b=b.fingerprint, vocab_a=a.vocab_size, n=n)


def _check_data(cfg, fingerprint: str):
    """``check_data`` on the sections it takes (data, model) of ``cfg``."""
    return check_data(cfg.data, cfg.model, fingerprint)


def _build_datasets(cfg, ctx, vocab_size: int, eod_id: int, fingerprint: str):
    """``build_datasets`` on the sections it takes (data, model, training, run dir) of ``cfg``."""
    return build_datasets(cfg.data, cfg.model, cfg.training, cfg.run_dir, ctx, vocab_size, eod_id, fingerprint)


def _copy(made: SimpleNamespace, tmp_path: Path) -> str:
    """A private copy of the shard directory (tests damage it)."""
    src = Path(made.prefix).parent
    dst = tmp_path / "shards"
    shutil.copytree(src, dst)
    return str(dst / Path(made.prefix).name)


def _cfg(tmp_path: Path, prefixes: list[str], tokenizer: str, vocab: int, verify: bool = False):
    raw = helpers.toy_config_dict(tmp_path / "run", prefixes, tokenizer=tokenizer, model={"vocab_size": vocab},
                                  data={"verify_shards": verify})
    return load_config(helpers.write_config(tmp_path / "cfg.json", raw))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, msg
    return msg


def _remove(shard: str) -> None:
    for suffix in (".bin", ".idx", ".meta.json"):
        Path(shard + suffix).unlink()


def test_good_set_resolves_through_its_manifest(made, tmp_path: Path) -> None:
    p = _copy(made, tmp_path)
    sets = _check_data(_cfg(tmp_path, [p], made.tok_a, made.vocab_a, verify=True), made.fp_a)
    assert [Path(s).name for s in sets[0].shards] == [f"{Path(p).name}_{k:05d}" for k in range(made.n)]
    assert sets[0].warning is None and sets[0].tokenizer_fingerprint == made.fp_a
    assert sets[0].tokenizer_path == made.tok_a  # the path the manifest recorded
    assert all(0 < m < made.vocab_a for m in sets[0].max_token_ids)


@pytest.mark.parametrize("which", ["middle", "last"])
def test_missing_shard_refused(made, tmp_path: Path, which: str) -> None:
    p = _copy(made, tmp_path)
    gone = indexed.shard_prefix(p, 1 if which == "middle" else made.n - 1)
    _remove(gone)
    with pytest.raises(DataCheckError) as exc:
        _check_data(_cfg(tmp_path, [p], made.tok_a, made.vocab_a), made.fp_a)
    msg = _one_line(exc)
    assert f"{gone}.idx: missing" in msg and f"{p}.manifest.json lists {made.n} shards" in msg


def test_unlisted_shard_refused(made, tmp_path: Path) -> None:
    p = _copy(made, tmp_path)
    extra = indexed.shard_prefix(p, made.n)  # e.g. left from an earlier, longer run
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(indexed.shard_prefix(p, 0) + suffix, extra + suffix)
    with pytest.raises(DataCheckError) as exc:
        resolve(p)
    assert f"{extra}.idx: a shard of {p} on disk that {p}.manifest.json does not list" in _one_line(exc)


def test_damaged_shard_refused(made, tmp_path: Path) -> None:
    p = _copy(made, tmp_path)
    shard = indexed.shard_prefix(p, 1)
    with open(shard + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(shard + ".bin") - 2)
    with pytest.raises(ValueError, match=r"_00001\.bin: .*check: bin size"):
        resolve(p)


def test_shard_of_another_run_refused(made, tmp_path: Path) -> None:
    """Shards 0 and 1 swapped (files and sidecars): each is intact on its own, and only
    the manifest's record of each shard tells them apart."""
    p = _copy(made, tmp_path)
    a, b, t = indexed.shard_prefix(p, 0), indexed.shard_prefix(p, 1), str(tmp_path / "swap")
    for suffix in (".bin", ".idx", ".meta.json"):
        os.replace(a + suffix, t + suffix)
        os.replace(b + suffix, a + suffix)
        os.replace(t + suffix, b + suffix)
    indexed.validate_shard(a, verify_hash=True, require_sidecar=True)  # intact alone
    with pytest.raises(DataCheckError) as exc:
        resolve(p)
    assert f"{a}.meta.json: " in _one_line(exc) and "check: shard vs manifest" in str(exc.value)


def test_other_tokenizer_refused(made, tmp_path: Path) -> None:
    p = _copy(made, tmp_path)
    cfg = _cfg(tmp_path, [p], made.tok_b, made.vocab_a)
    with pytest.raises(DataCheckError) as exc:
        _check_data(cfg, made.fp_b)
    msg = _one_line(exc)
    for part in (f"{p}.manifest.json", made.fp_a, made.tok_a, made.tok_b, made.fp_b, "data.prefixes[0]"):
        assert part in msg, (part, msg)
    _check_data(_cfg(tmp_path, [p], made.tok_a, made.vocab_a), made.fp_a)  # the control


def test_token_ids_beyond_the_vocabulary_refused(made, tmp_path: Path) -> None:
    p = _copy(made, tmp_path)
    sets = _check_data(_cfg(tmp_path, [p], made.tok_a, made.vocab_a), made.fp_a)
    top = max(sets[0].max_token_ids)
    with pytest.raises(DataCheckError) as exc:
        _check_data(_cfg(tmp_path, [p], made.tok_a, top), made.fp_a)  # id `top` is not below `top`
    msg = _one_line(exc)
    assert f"holds token id {top}, not below model.vocab_size {top}" in msg
    _check_data(_cfg(tmp_path, [p], made.tok_a, top + 1), made.fp_a)  # the control: top + 1 is enough


def test_recorded_largest_id_is_the_real_one(made) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for shard, top in zip(resolve(made.prefix).shards, resolve(made.prefix).max_token_ids):
        ds = IndexedDataset(shard, mmap=True)
        assert top == max(int(np.max(ds[i])) for i in range(len(ds))) == indexed.scan_max_token_id(shard)


def _plain_megatron(prefix: Path, top: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for n in range(20, 80):
        b.add_document(np.arange(n, dtype=np.uint16) % top, [n])
    b.add_document(np.array([3, top, 3], dtype=np.uint16), [3])
    b.finalize(str(prefix) + ".idx")


def test_plain_megatron_shards_warn_and_are_scanned(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for k in range(2):
        _plain_megatron(tmp_path / "plain" / f"toy_{k:05d}", top=300 + k)
    p = str(tmp_path / "plain" / "toy")
    sets = _check_data(_cfg(tmp_path, [p], "unused", 400), "any-fingerprint")  # nothing recorded to compare
    assert len(sets[0].shards) == 2 and sets[0].max_token_ids == [300, 301]
    warning = sets[0].warning
    assert warning and "\n" not in warning and "no toy.manifest.json guards these 2 shards" in warning
    with pytest.raises(DataCheckError, match=r"toy_00001\.bin holds token id 301, not below model.vocab_size 301"):
        _check_data(_cfg(tmp_path, [p], "unused", 301), "any-fingerprint")
    # build_datasets prints the warning on rank 0, as one line, before its first collective
    class Reached(Exception):
        pass

    def collective(*_: object) -> None:
        raise Reached

    for rank in (0, 1):
        ctx = SimpleNamespace(rank=rank, world_size=2, broadcast_object=collective, barrier=collective)
        with pytest.raises(Reached):
            _build_datasets(_cfg(tmp_path, [p], "unused", 400), ctx, 400, 0, "any-fingerprint")
        err = capsys.readouterr().err.splitlines()
        assert err == ([f"warning: data.prefixes[0]: {warning}"] if rank == 0 else []), err


def test_unfinished_preprocess_refused(made, tmp_path: Path) -> None:
    p = _copy(made, tmp_path)
    Path(p + ".manifest.json").unlink()
    Path(p + ".resume").mkdir()
    with pytest.raises(DataCheckError, match=r"\.resume: preprocessing of .* did not finish"):
        resolve(p)


def test_refused_before_any_collective(made, tmp_path: Path) -> None:
    """build_datasets checks before its first collective: a mismatch raises on every rank
    without any rank waiting for another (here: the context's collectives must not run)."""
    def collective(*_: object) -> None:
        raise AssertionError("a collective ran before the data checks")

    ctx = SimpleNamespace(rank=1, world_size=2, broadcast_object=collective, barrier=collective)
    p = _copy(made, tmp_path)
    with pytest.raises(DataCheckError, match="records tokenizer fingerprint"):
        _build_datasets(_cfg(tmp_path, [p], made.tok_b, made.vocab_a), ctx, 400, 1, made.fp_b)


def test_pretrain_exits_1_with_one_line(made, tmp_path: Path) -> None:
    """The whole launcher: shards of tokenizer A, data.tokenizer B -> exit 1, one line."""
    raw = helpers.toy_config_dict(tmp_path / "run", [made.prefix], tokenizer=made.tok_b,
                                  model={"vocab_size": made.vocab_a, "n_layer": 1, "n_embd": 32, "n_head": 2, "n_ctx": 32},
                                  data={"seq_len": 32}, training={"train_steps": 2, "micro_batch_size": 2,
                                                                  "global_batch_size": 2})
    path = helpers.write_config(tmp_path / "cfg.json", raw)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", str(path)],
                          check=False, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"pretrain: error: data.prefixes[0]: {made.prefix}.manifest.json records tokenizer "
                               f"fingerprint {made.fp_a}"), lines
    assert f"data.tokenizer {made.tok_b} has fingerprint {made.fp_b}" in lines[0], lines


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
