"""Fine-tuned exports used outside training: launch/predict.py, the similarity head's
symmetry, Hugging Face's GPT2DoubleHeadsModel on a multiple-choice export, and the one-line
errors of launch/finetune.py for bad task files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests import helpers

from .conftest import write_jsonl

pytestmark = pytest.mark.slow
ROOT = helpers.ROOT


def _logits(export, out, *files):
    res = helpers.run(helpers.python_cmd(ROOT / "tests" / "finetune" / "_logits.py", export, out, *files),
                      timeout=240)
    assert res.rc == 0, res.describe()
    return np.load(out)


def test_similarity_head_is_symmetric_in_its_two_texts(ft_runs, ft_tmp):
    rows = [json.loads(line) for line in (ft_runs.tasks / "sim_valid.jsonl").read_text().splitlines()]
    swapped = write_jsonl(ft_tmp / "sim_swapped.jsonl",
                          [{**r, "text_a": r["text_b"], "text_b": r["text_a"]} for r in rows])
    got = _logits(ft_runs.out / "learn_similarity" / "best", ft_tmp / "sim.npz",
                  ft_runs.tasks / "sim_valid.jsonl", swapped)
    assert not np.array_equal(got["tokens0"], got["tokens1"])          # the inputs differ ...
    assert np.abs(got["logits0"] - got["logits1"]).max() <= 1e-5        # ... the prediction does not
    assert np.abs(got["logits0"]).max() > 0.1                           # and it is not a constant


def test_predict_writes_labels_and_probabilities(ft_runs, ft_tmp):
    out = ft_tmp / "preds.jsonl"
    res = helpers.run(helpers.python_cmd(ROOT / "launch" / "predict.py", "--model",
                                         ft_runs.out / "learn_classification" / "best", "--input",
                                         ft_runs.tasks / "cls_valid.jsonl", "--out", out), timeout=240)
    assert res.rc == 0, res.describe()
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    gold = [json.loads(line)["label"] for line in (ft_runs.tasks / "cls_valid.jsonl").read_text().splitlines()]
    assert len(preds) == len(gold)
    assert all(abs(sum(p["probabilities"]) - 1) < 1e-4 and len(p["probabilities"]) == 3 for p in preds)
    acc = np.mean([p["label"] == g for p, g in zip(preds, gold, strict=True)])
    assert acc == pytest.approx(ft_runs.results("learn_classification")["valid"]["accuracy"], abs=1e-9)
    assert "accuracy" in res.stdout


@pytest.mark.parametrize("run,layout", [("learn_classification", ("--tp", "2")),
                                        ("learn_multiple_choice", ("--pp", "2"))], ids=["tp2", "pp2"])
def test_parallel_predict_writes_the_tp1_predictions(ft_runs, ft_tmp, run, layout):
    """torchrun --nproc-per-node 2 launch/predict.py at TP=2 (classification) and PP=2
    (multiple choice: the choices' scores from the last stage's head) writes the one-process
    predictions: the same labels, probabilities equal to rounding."""
    best = ft_runs.out / run / "best"
    data = ft_runs.tasks / ("cls_valid.jsonl" if run == "learn_classification" else "mc_valid.jsonl")
    one, two = ft_tmp / f"{run}_tp1.jsonl", ft_tmp / f"{run}_{layout[0][2:]}2.jsonl"
    res = helpers.run(helpers.python_cmd(ROOT / "launch" / "predict.py", "--model", best, "--input", data,
                                         "--out", one), timeout=240)
    assert res.rc == 0, res.describe()
    res = helpers.run(helpers.torchrun_cmd(ROOT / "launch" / "predict.py", "--model", best, "--input", data,
                                           "--out", two, *layout, nproc=2),
                      env=helpers.child_env(GPT_DIST_PG_TIMEOUT="120"), timeout=300)
    assert res.rc == 0, res.describe()
    assert res.stdout.count("predicted ") == 1      # rank 0 writes and reports
    want = [json.loads(line) for line in one.read_text().splitlines()]
    got = [json.loads(line) for line in two.read_text().splitlines()]
    assert len(got) == len(want) > 0
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert len({w["label"] for w in want}) > 1      # not a constant prediction
    for g, w in zip(got, want, strict=True):
        assert g["line"] == w["line"]
        assert np.abs(np.array(g["probabilities"]) - np.array(w["probabilities"])).max() <= 2e-6, (g, w)


def test_hf_double_heads_model_scores_choices_like_ours(ft_runs, ft_tmp):
    import torch
    from transformers import GPT2DoubleHeadsModel

    from gpt_dist.export import export_state, load_export

    best = ft_runs.out / "learn_multiple_choice" / "best"
    cfg, state, task = load_export(best)
    assert task is not None and task["task"] == "multiple_choice"
    conf = json.loads((best / "config.json").read_text())
    hf_dir = export_state(state, cfg, ft_tmp / "mc_hf", fmt="hf", training_config=conf["training_config"])
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["GPT2DoubleHeadsModel"]
    ours = _logits(best, ft_tmp / "mc.npz", ft_runs.tasks / "mc_valid.jsonl")
    model = GPT2DoubleHeadsModel.from_pretrained(hf_dir).eval()
    tokens = torch.from_numpy(ours["tokens0"]).view(-1, 3, ours["tokens0"].shape[-1])
    extract = torch.from_numpy(ours["extract0"]).view(-1, 3)
    with torch.no_grad():
        mc = model(input_ids=tokens, mc_token_ids=extract).mc_logits.double().numpy()
    assert mc.shape == ours["logits0"].shape
    assert np.abs(mc - ours["logits0"]).max() <= 1e-4
    # and a classification head has no Hugging Face model: refused with one line
    from gpt_dist.export import ExportError

    cls_best = ft_runs.out / "learn_classification" / "best"
    c2, s2, _ = load_export(cls_best)
    with pytest.raises(ExportError, match="native"):
        export_state(s2, c2, ft_tmp / "cls_hf", fmt="hf",
                     training_config=json.loads((cls_best / "config.json").read_text())["training_config"])


@pytest.mark.parametrize("row,why", [
    ('{"text": "cat a", "label": "cow"}', "cow"),
    ('{"text": "cat a"', "invalid JSON"),
    ('{"premise": "a", "hypothesis": "b", "label": "cat"}', "text"),
])
def test_bad_task_file_is_one_line_with_file_and_line(ft_runs, ft_tmp, row, why):
    bad = ft_tmp / "bad.jsonl"
    bad.write_text('{"text": "cat dog", "label": "cat"}\n' + row + "\n")
    cfg = json.loads((ft_runs.out / "learn_classification" / "config.json").read_text())
    cfg["run"]["dir"] = str(ft_tmp / "bad_run")
    cfg["finetune"]["train_file"] = str(bad)
    path = helpers.write_config(ft_tmp / "bad.json", cfg)
    res = helpers.run(helpers.python_cmd(ROOT / "launch" / "finetune.py", "--config", path), timeout=240)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.rc == 2, res.describe()
    assert len(lines) == 1 and f"{bad}:2:" in lines[0] and why in lines[0], lines
    assert not (ft_tmp / "bad_run" / "checkpoints").exists()
