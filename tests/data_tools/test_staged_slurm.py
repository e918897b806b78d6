"""slurm/preprocess.sh under a real one-node Slurm (tests/cluster/_slurm.py starts munged,
slurmctld and slurmd; skipped where Slurm cannot be installed or started, as there).

* the chain (plan -> keys[3] -> bands[3] -> components -> tokenize[3] -> finalize, job
  arrays chained with afterok) completes and keeps the single-node command's documents,
  tokens and counters;
* tokenize task 1 SIGKILLed mid-way (after its first shard, before its marker): the chain
  stops there, the report job names the task's log, and submitting the same command again
  reruns only what has no marker and gives the identical result;
* an input deleted after the plan: its keys task fails with one line naming the file, the
  later stages never run, and the report job repeats that line with the task's log.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from gpt_dist.data.preprocess import PreprocessConfig, preprocess
from gpt_dist.data.staged import load_plan, plan_stage
from tests.data_tools import dt_common as c

pytestmark = pytest.mark.slow

SCRIPT = c.ROOT / "slurm" / "preprocess.sh"
TASKS = 3
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    from tests.cluster import _slurm

    why = _slurm.ensure_installed()
    if why:
        pytest.skip(why)
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd/munged with SlurmUser=root needs root")
    cluster = _slurm.LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, base_docs, sp_dir) -> dict:
    """~1,500 distinct documents in two .jsonl files (byte ranges) and a .jsonl.gz (whole),
    with planted exact and near copies across files, and a single-node reference run."""
    root = tmp_path_factory.mktemp("staged_slurm")
    words = " ".join(base_docs).split()
    rng = np.random.RandomState(0)
    docs = [" ".join(words[i] for i in rng.randint(0, len(words), rng.randint(120, 300))) for _ in range(1500)]
    docs[700] = docs[10]  # exact, across files
    docs[1450] = c.near_copy(docs[20])  # near, across files
    src = root / "in"
    src.mkdir()
    for name, part in (("a.jsonl", docs[:600]), ("b.jsonl", docs[600:1400])):
        (src / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in part), encoding="utf-8")
    import gzip

    with gzip.open(src / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in docs[1400:]) + "{bad json\n")
    options = ["--input", str(src / "*.jsonl*"), "--tokenizer", str(sp_dir), "--shard-tokens", "3000"]
    ref = str(root / "single" / "out")
    manifest = preprocess(PreprocessConfig(inputs=[str(src / "*.jsonl*")], tokenizer=str(sp_dir), output_prefix=ref,
                                           workers=0, shard_tokens=3000, progress=False))
    assert manifest["counts"]["duplicates"] == {"exact": 1, "near": 1}
    return {"src": src, "options": options, "ref": ref, "manifest": manifest, "root": root}


def _wrapper(path: Path, kill_task: int | None = None) -> Path:
    """PYTHON for the jobs: the venv's python; with ``kill_task``, that tokenize task's
    first try is SIGKILLed as soon as its first shard is committed (a task dying mid-way)."""
    kill = ""
    if kill_task is not None:
        flag = path.parent / f"{path.name}.killed"
        part = f"$STAGED_PREPROCESS_WORK/tokenize/{kill_task:05d}/shard_00000.idx"
        kill = f"""if [ "${{STAGED_PREPROCESS_STAGE:-}}" = tokenize ] && [ "${{SLURM_ARRAY_TASK_ID:-}}" = {kill_task} ] \\
   && [ ! -e "{flag}" ]; then
    touch "{flag}"
    "{c.PY}" "$@" & pid=$!
    while kill -0 $pid 2>/dev/null && [ ! -e "{part}" ]; do sleep 0.01; done
    kill -9 $pid; wait $pid; exit $?
fi
"""
    path.write_text(f"#!/bin/bash\n{kill}exec \"{c.PY}\" \"$@\"\n")
    path.chmod(0o755)
    return path


def _submit(slurm, work: Path, prefix: str, options: list[str], python: Path) -> dict[str, int]:
    env = c.cli_env(SLURM_CONF=slurm.env["SLURM_CONF"], PYTHON=str(python), CPUS_PER_TASK="1",
                    SBATCH_ARGS="--time=15")
    proc = subprocess.run([str(SCRIPT), "--tasks", str(TASKS), "--work-dir", str(work), "--",
                           *options, "--output-prefix", prefix], env=env, cwd=c.ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr + slurm.logs()
    words = proc.stdout.split("\n")[0].split()
    return {words[i]: int(words[i + 1]) for i in range(0, len(words), 2)}


def _state(slurm, job: str) -> str:
    out = slurm.scontrol("show", "job", "-o", job, check=False)
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "")


def _wait(slurm, jobs: dict[str, int], work: Path, timeout: float = 400) -> str:
    """The finalize job's end state, once every job of the chain (and the report job that
    runs only when the chain stopped) has ended."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = {name: _state(slurm, str(j)) for name, j in jobs.items()}
        if all(s in DONE for s in states.values()):
            return states["finalize"]
        time.sleep(1)
    subprocess.run(["scancel", *map(str, jobs.values())], env=slurm.env, timeout=30, check=False)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-800:]}" for p in sorted((work / "logs").glob("*")))
    pytest.fail(f"the chain did not end in {timeout} s: {states}\n{logs}\n{slurm.logs()}")


def _same_as_single_node(prefix: str, corpus: dict) -> None:
    assert [d.tolist() for d in c.read_docs(prefix)] == [d.tolist() for d in c.read_docs(corpus["ref"])]
    got = json.loads(Path(prefix + ".manifest.json").read_text())
    assert got["counts"] == corpus["manifest"]["counts"]
    assert got["staged"]["tasks"] == TASKS
    assert Path(prefix + ".rejected.jsonl").read_text() == Path(corpus["ref"] + ".rejected.jsonl").read_text()


def test_the_chain_completes_and_equals_the_single_node_command(slurm, corpus, tmp_path) -> None:
    work, prefix = tmp_path / "work", str(tmp_path / "out" / "corpus")
    jobs = _submit(slurm, work, prefix, corpus["options"], _wrapper(tmp_path / "python"))
    assert _wait(slurm, jobs, work) == "COMPLETED", (work / "logs" / "finalize_0.out").read_text()
    assert len(list((work / "logs").glob("keys_*.out"))) == TASKS  # a job array of TASKS elements
    assert _state(slurm, str(jobs["report"])) == "CANCELLED"  # the chain did not stop: no report
    assert not (work / "logs" / "status_0.out").exists()
    assert len({r["task"] for r in load_plan(work)["ranges"]}) == TASKS
    _same_as_single_node(prefix, corpus)


def test_a_task_killed_mid_way_is_rerun_with_the_identical_result(slurm, corpus, tmp_path) -> None:
    work, prefix = tmp_path / "work", str(tmp_path / "out" / "corpus")
    python = _wrapper(tmp_path / "python", kill_task=1)
    jobs = _submit(slurm, work, prefix, corpus["options"], python)
    assert _wait(slurm, jobs, work) == "CANCELLED"  # afterok never satisfied: the chain stops
    assert _state(slurm, f"{jobs['tokenize']}_1") == "FAILED"
    assert (work / "tokenize" / "00001" / "shard_00000.idx").exists()  # killed mid-way...
    assert not (work / "tokenize" / "00001.done").exists()  # ...so not complete
    assert not Path(prefix + ".manifest.json").exists()
    report = (work / "logs" / "status_0.out").read_text()
    assert "tokenize: 2/3 tasks complete" in report and f"tokenize task 1: {work / 'logs' / 'tokenize_1.out'}" in report
    keys_marker = work / "keys" / "00001.done"
    stamp = keys_marker.stat().st_mtime_ns
    jobs = _submit(slurm, work, prefix, corpus["options"], python)  # the same command again
    assert _wait(slurm, jobs, work) == "COMPLETED", (work / "logs" / "finalize_0.out").read_text()
    assert keys_marker.stat().st_mtime_ns == stamp  # completed tasks were skipped
    _same_as_single_node(prefix, corpus)


def test_a_vanished_input_stops_the_chain_naming_it(slurm, corpus, sp_dir, tmp_path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for p in corpus["src"].iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    work, prefix = tmp_path / "work", str(tmp_path / "out" / "corpus")
    options = ["--input", str(src / "*.jsonl*"), "--tokenizer", str(sp_dir), "--shard-tokens", "3000"]
    plan_stage(PreprocessConfig(inputs=[str(src / "*.jsonl*")], tokenizer=str(sp_dir), output_prefix=prefix,
                                shard_tokens=3000), work, TASKS)
    plan = load_plan(work)
    gone = src / "c.jsonl.gz"
    task = next(r["task"] for r in plan["ranges"] if plan["files"][r["file"]]["path"] == str(gone))
    gone.unlink()
    jobs = _submit(slurm, work, prefix, options, _wrapper(tmp_path / "python"))
    assert _wait(slurm, jobs, work) == "CANCELLED"
    assert _state(slurm, f"{jobs['keys']}_{task}") == "FAILED"
    log = (work / "logs" / f"keys_{task}.out").read_text()
    errors = [line for line in log.splitlines() if "error" in line.lower()]
    line = f"preprocess: error: {gone}: input of keys task {task} vanished since the plan"
    assert errors == [line], log
    report = (work / "logs" / "status_0.out").read_text()  # the report job names the failed task's log
    assert f"keys: {TASKS - 1}/{TASKS} tasks complete\n  keys task {task}: {work / 'logs' / f'keys_{task}.out'}: {line}" \
        in report, report
    assert not list((work / "logs").glob("tokenize_*")) and not list((work / "logs").glob("bands_*"))
