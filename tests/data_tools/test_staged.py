"""The staged preprocessing job (gpt_dist.data.staged) equals the single-node command.

The corpus is the multi-input one of test_preprocess (a .jsonl split into byte ranges, a
.jsonl.gz and .txt files read whole, planted exact and near duplicates and filter
failures) and the bad-input T10 corpus (rejects with file and line). Every comparison is
against a single-node run of the same inputs, never against hard-coded figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from gpt_dist.data.preprocess import PreprocessConfig, preprocess
from gpt_dist.data.staged import OFFSET_BITS, StageError, load_plan
from gpt_dist.data.staged_merge import _greedy_drops, run_all, run_stage
from tests.data_tools import dt_common as c

COUNT_KEYS = ("records", "documents", "tokens", "input_bytes", "text_bytes", "rejected", "filtered",
              "duplicates", "surrogates_replaced", "control_chars_removed")


def _cfg(multi_run: c.MultiRun, sp_dir: Path, prefix: str, **kw) -> PreprocessConfig:
    src = multi_run.inputs[0].parent
    return PreprocessConfig(inputs=[str(src / "*.jsonl*"), str(src / "texts")], tokenizer=str(sp_dir),
                            output_prefix=prefix, workers=0, shard_tokens=60_000, progress=False, **kw)


@pytest.fixture(scope="module")
def staged_runs(multi_run, sp_dir, dt_tmp) -> dict[int, tuple[str, dict]]:
    out = {}
    for tasks in (1, 3, 4):
        prefix = str(dt_tmp / f"staged{tasks}" / "out" / "corpus")
        manifest = run_all(_cfg(multi_run, sp_dir, prefix), dt_tmp / f"staged{tasks}" / "work", tasks)
        out[tasks] = (prefix, manifest)
    return out


def _docs(prefix: str) -> list[list[int]]:
    return [d.tolist() for d in c.read_docs(prefix)]


@pytest.mark.parametrize("tasks", [1, 3, 4])
def test_staged_keeps_the_same_documents_and_tokens(staged_runs, multi_run, dt_tmp, tasks) -> None:
    prefix, manifest = staged_runs[tasks]
    plan = load_plan(dt_tmp / f"staged{tasks}" / "work")
    if tasks > 1:  # a.jsonl really is cut into byte ranges of several tasks
        assert len({r["task"] for r in plan["ranges"] if r["file"] == 0}) > 1 or \
            len([r for r in plan["ranges"] if r["file"] == 0]) > 1
    assert _docs(prefix) == _docs(multi_run.prefix)
    for key in COUNT_KEYS:
        assert manifest["counts"][key] == multi_run.manifest["counts"][key], key
    assert manifest["counts"]["duplicates"] == {"exact": 1, "near": 1}  # the planted ones
    assert manifest["config_key"] == multi_run.manifest["config_key"]


def test_staged_shards_are_accepted_by_training(staged_runs, sp_dir, sp_tok, tmp_path) -> None:
    """The trainer's own data check (gpt_dist.training.data.check_data: manifest, every shard
    and its sha256, tokenizer fingerprint, largest id) accepts the staged prefix, and
    megatron-core's GPTDataset reads samples of it."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from gpt_dist.config import config_from_dict
    from gpt_dist.training.data import check_data
    from tests import helpers

    prefix, manifest = staged_runs[4]
    cfg = config_from_dict(helpers.toy_config_dict(tmp_path / "run", [prefix], tokenizer=sp_dir,
                                                   model={"vocab_size": sp_tok.vocab_size},
                                                   data={"verify_shards": True}))
    sets = check_data(cfg.data, cfg.model, sp_tok.fingerprint)
    assert [Path(s).name for s in sets[0].shards] == [e["prefix"] for e in manifest["shards"]]
    assert len(sets[0].shards) >= 2

    class Tok:
        vocab_size, eod, pad = sp_tok.vocab_size, sp_tok.eod_id, -1
        unique_identifiers: ClassVar[dict[str, str]] = {"class": "test"}

    ds_cfg = GPTDatasetConfig(random_seed=1, sequence_length=64, blend=(sets[0].shards, None), split="1,0,0",
                              path_to_cache=None, tokenizer=Tok(), reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
                              mmap_bin_files=True)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [50, None, None], lambda: True, ds_cfg).build()
    assert len(train) == 50 and int(train[49]["tokens"].max()) < sp_tok.vocab_size


def test_negative_control_dedup_off_differs(multi_run, sp_dir, dt_tmp) -> None:
    """The comparison can fail: without deduplication the staged job keeps other documents."""
    prefix = str(dt_tmp / "staged_nodedup" / "out" / "corpus")
    from gpt_dist.data.dedup import DedupConfig

    run_all(_cfg(multi_run, sp_dir, prefix, dedup=DedupConfig(exact=False, near=False)),
            dt_tmp / "staged_nodedup" / "work", 3)
    docs, ref = _docs(prefix), _docs(multi_run.prefix)
    assert docs != ref
    assert len(docs) == len(ref) + 2


def test_rejects_equal_the_single_node_list(base_docs, sp_dir, tmp_path) -> None:
    """Malformed lines are counted and listed (file, absolute line, reason) as the
    single-node command lists them, with the T10 corpus cut into 4 ranges."""
    corpus = c.make_t10_corpus(tmp_path, base_docs)
    cfg = {"inputs": [str(corpus.path)], "tokenizer": str(sp_dir), "workers": 0, "shard_tokens": 60_000, "progress": False}
    single_prefix = str(tmp_path / "single" / "out")
    single = preprocess(PreprocessConfig(output_prefix=single_prefix, **cfg))
    prefix = str(tmp_path / "staged" / "out")
    staged = run_all(PreprocessConfig(output_prefix=prefix, **cfg), tmp_path / "work", 4)
    # one file in byte ranges: the 2.1 MB line 20 fills the first, line 25's reject is in the second
    assert len(load_plan(tmp_path / "work")["ranges"]) >= 2
    assert staged["counts"] == single["counts"]
    got = Path(prefix + ".rejected.jsonl").read_text(encoding="utf-8")
    want = Path(single_prefix + ".rejected.jsonl").read_text(encoding="utf-8")
    assert got == want and got.count("\n") == len(corpus.bad)
    assert _docs(prefix) == _docs(single_prefix)


def test_rerun_skips_completed_tasks_and_redoes_a_partial_one(multi_run, sp_dir, dt_tmp) -> None:
    work = dt_tmp / "staged_rerun" / "work"
    prefix = str(dt_tmp / "staged_rerun" / "out" / "corpus")
    first = run_all(_cfg(multi_run, sp_dir, prefix), work, 3)
    marker = work / "keys" / "00001.done"
    stamp = marker.stat().st_mtime_ns
    # a task that died after writing part of its output: no marker, a truncated output
    (work / "tokenize" / "00002.done").unlink()
    shard = work / "tokenize" / "00002" / "shard_00000.bin"
    shard.write_bytes(shard.read_bytes()[:10])
    Path(prefix + ".manifest.json").unlink()
    (work / "finalize" / "00000.done").unlink()
    with pytest.raises(StageError, match="tokenize task 2 did not complete"):
        run_stage("finalize", work)
    again = run_all(_cfg(multi_run, sp_dir, prefix), work, 3)
    assert marker.stat().st_mtime_ns == stamp  # skipped
    assert again["shards"] == first["shards"]  # same bytes (sha256 in the manifest)
    assert _docs(prefix) == _docs(multi_run.prefix)
    assert run_stage("finalize", work)["already_complete"]


def test_vanished_input_stops_the_task_naming_it(multi_run, sp_dir, dt_tmp, tmp_path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for p in multi_run.inputs[:2]:
        (src / p.name).write_bytes(p.read_bytes())
    cfg = PreprocessConfig(inputs=[str(src / "*")], tokenizer=str(sp_dir), output_prefix=str(tmp_path / "o"),
                           workers=0, progress=False)
    run_stage("plan", tmp_path / "work", cfg=cfg, tasks=2)
    (src / "b.jsonl.gz").unlink()
    with pytest.raises(StageError) as err:
        for t in range(2):
            run_stage("keys", tmp_path / "work", t)
    assert str(err.value) == f"{src / 'b.jsonl.gz'}: input of keys task 1 vanished since the plan"


def test_greedy_rule_keeps_the_lowest_id_and_chain_ends() -> None:
    """The single-node rule on groups: 1~2 and 2~3 (near) drop only 2; 5==7 exact drops 7
    as exact; 9 shares a near key with dropped 7 only and is kept."""
    u = np.uint64
    ex_k, ex_d = np.array([50, 50], u), np.array([5, 7], u)
    nr_k, nr_d = np.array([10, 10, 11, 11, 12, 12], u), np.array([1, 2, 2, 3, 7, 9], u)
    for chunk in (1, 2, 1 << 20):  # the loop's chunks do not change the result
        dropped, kinds = _greedy_drops(ex_k, ex_d, nr_k, nr_d, chunk=chunk)
        assert dropped.tolist() == [2, 7] and kinds.tolist() == [2, 1]
    assert OFFSET_BITS == 40


def test_cli_task_id_from_slurm_and_one_line_errors(tmp_path) -> None:
    """``--stage keys`` takes its task from SLURM_ARRAY_TASK_ID; without either, or without
    a plan, one line says what is missing."""
    work = tmp_path / "work"
    proc = c.run_cli("preprocess.py", "--stage", "keys", "--work-dir", work)
    assert proc.returncode == 1
    assert proc.stderr == "preprocess: error: --stage keys: give --task-id (SLURM_ARRAY_TASK_ID is not set)\n"
    proc = c.run_cli("preprocess.py", "--stage", "keys", "--work-dir", work, env=c.cli_env(SLURM_ARRAY_TASK_ID="2"))
    assert proc.returncode == 1
    assert proc.stderr == f"preprocess: error: {work / 'plan.json'}: no plan; run --stage plan first\n"


def _edit(text: str, every: int, offset: int, word: str) -> str:
    words = text.split(" ")
    for i in range(offset, len(words), every):
        words[i] = word
    return " ".join(words)


def test_a_near_duplicate_chain_keeps_both_ends_as_the_single_node_command(base_docs, sp_dir, tmp_path) -> None:
    """A~B and B~C share MinHash bands, A and C share none. The single-node command keeps A
    and C (C resembles no *kept* document); so must the staged job, with A, B and C in
    different tasks. Plain "lowest id per connected component" would drop C."""
    from gpt_dist.data.dedup import DedupConfig, MinHasher

    mh = MinHasher(DedupConfig())
    chain = None
    for k, a in enumerate(base_docs[100:], 100):
        for every in range(8, 60, 4):
            b = _edit(a, every, 3, "alpha")
            c = _edit(b, every, every // 2 + 3, "beta")
            ka, kb, kc = (set(mh.band_keys(x).tolist()) for x in (a, b, c))
            if ka & kb and kb & kc and not ka & kc:
                chain = (k, a, b, c)
                break
        if chain:
            break
    assert chain is not None, "no chain among the base documents"
    k, a, b, c = chain
    others = [d for i, d in enumerate(base_docs[:100]) if i != k]
    files = [others[:30] + [a], others[30:60] + [b], others[60:] + [c]]
    src = tmp_path / "in"
    src.mkdir()
    for i, docs in enumerate(files):
        (src / f"{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    cfg = {"inputs": [str(src / "*.jsonl")], "tokenizer": str(sp_dir), "workers": 0, "progress": False}
    single = preprocess(PreprocessConfig(output_prefix=str(tmp_path / "single" / "out"), **cfg))
    staged = run_all(PreprocessConfig(output_prefix=str(tmp_path / "staged" / "out"), **cfg), tmp_path / "work", 3)
    assert single["counts"]["duplicates"] == {"exact": 0, "near": 1}  # B only: C is kept
    assert staged["counts"] == single["counts"]
    assert _docs(str(tmp_path / "staged" / "out")) == _docs(str(tmp_path / "single" / "out"))
    assert len({r["task"] for r in load_plan(tmp_path / "work")["ranges"]}) == 3
