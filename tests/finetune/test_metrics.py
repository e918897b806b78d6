"""Task metrics equal scikit-learn's and scipy's on the same predictions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import sklearn.metrics as sk  # the test extra (setup.py); the library itself does not use them
from scipy import stats

from gpt_dist.finetune import metrics as m
from gpt_dist.finetune.tasks import NO_LABEL, TaskSpec


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def _cases():
    rng = np.random.default_rng(1234)
    for n_classes in (2, 3, 5):
        for n in (1, 2, 7, 50, 400):
            y = rng.integers(0, n_classes, n)
            noisy = np.where(rng.random(n) < 0.6, y, rng.integers(0, n_classes, n))
            yield y, noisy
            yield y, rng.integers(0, n_classes, n)
            yield y, np.full(n, n_classes - 1)  # constant predictions
            yield np.zeros(n, dtype=int), noisy  # constant labels


CLASS_CASES = list(_cases())


@pytest.mark.parametrize("i", range(len(CLASS_CASES)))
def test_class_metrics_equal_sklearn(i):
    y, p = CLASS_CASES[i]
    assert m.accuracy(p, y) == pytest.approx(sk.accuracy_score(y, p), abs=1e-12)
    assert m.matthews_corrcoef(p, y) == pytest.approx(_quiet(sk.matthews_corrcoef, y, p), abs=1e-12)
    assert m.f1(p, y, average="macro") == pytest.approx(_quiet(sk.f1_score, y, p, average="macro"), abs=1e-12)
    if set(np.unique(np.concatenate([y, p]))) <= {0, 1}:
        assert m.f1(p, y) == pytest.approx(_quiet(sk.f1_score, y, p), abs=1e-12)


def _real_cases():
    rng = np.random.default_rng(99)
    for n in (2, 3, 10, 200):
        x = rng.normal(size=n)
        yield x, 0.5 * x + rng.normal(size=n)
        yield x, -x ** 3
        yield np.round(x * 2) / 2, np.round(rng.normal(size=n))  # many ties
        yield rng.integers(0, 3, n).astype(float), rng.integers(0, 4, n).astype(float)
    yield np.array([1.0, 2.0, 2.0, 3.0, 3.0, 3.0]), np.array([6.0, 5.0, 5.0, 4.0, 5.0, 1.0])


REAL_CASES = list(_real_cases())


@pytest.mark.parametrize("i", range(len(REAL_CASES)))
def test_correlations_equal_scipy(i):
    x, y = REAL_CASES[i]
    for ours, theirs in ((m.pearson, stats.pearsonr), (m.spearman, stats.spearmanr)):
        want = _quiet(theirs, x, y)[0]
        got = ours(x, y)
        if math.isnan(want):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(want, abs=1e-12)


def test_rankdata_equals_scipy():
    x = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5])
    assert m.rankdata(x).tolist() == stats.rankdata(x, method="average").tolist()


def test_constant_inputs():
    assert math.isnan(m.pearson([1, 1, 1], [1, 2, 3])) and math.isnan(_quiet(stats.pearsonr, [1, 1, 1], [1, 2, 3])[0])
    assert math.isnan(m.spearman([1, 2, 3], [5, 5, 5]))
    assert m.matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0 == sk.matthews_corrcoef([0, 1, 1], [1, 1, 1])
    reg = TaskSpec(task="similarity", num_labels=1, max_len=16)
    assert m.compute_metrics(reg, [2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == {"pearson": 0.0, "spearman": 0.0}
    assert m.compute_metrics(reg, [1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == {"pearson": 0.0, "spearman": 0.0}
    with pytest.raises(ValueError, match="at least 2"):
        m.pearson([1.0], [2.0])
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        m.accuracy([1, 2, 3], [1, 2])


def spec(task: str, n: int = 2) -> TaskSpec:
    return TaskSpec(task=task, num_labels=n, max_len=16)  # type: ignore[arg-type]


def test_compute_metrics_per_task():
    y, p = CLASS_CASES[12]  # 2 classes, 50 examples
    assert len(y) == 50 and set(y) == {0, 1}
    got = m.compute_metrics(spec("classification"), p, y)
    assert list(got) == ["accuracy", "f1", "mcc"] == list(m.metric_names(spec("entailment")))
    assert got == {"accuracy": pytest.approx(sk.accuracy_score(y, p)), "f1": pytest.approx(sk.f1_score(y, p)),
                   "mcc": pytest.approx(sk.matthews_corrcoef(y, p))}
    y3, p3 = CLASS_CASES[32]  # 3 classes, 50 examples
    assert len(y3) == 50 and set(y3) == {0, 1, 2}
    got = m.compute_metrics(spec("entailment", 3), p3, y3)
    assert got == {"accuracy": pytest.approx(sk.accuracy_score(y3, p3)),
                   "f1_macro": pytest.approx(sk.f1_score(y3, p3, average="macro")),
                   "mcc": pytest.approx(sk.matthews_corrcoef(y3, p3))}
    assert list(m.compute_metrics(spec("similarity"), p, y)) == ["accuracy", "f1"]
    assert list(m.compute_metrics(spec("multiple_choice", 3), p3, y3)) == ["accuracy"]
    x, t = REAL_CASES[0]
    got = m.compute_metrics(spec("similarity", 1), x, t)
    assert got == {"pearson": pytest.approx(stats.pearsonr(x, t)[0]), "spearman": pytest.approx(stats.spearmanr(x, t)[0])}
    assert all(isinstance(v, float) for v in got.values())


def test_compute_metrics_from_scores():
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(40, 4))
    labels = rng.integers(0, 4, 40)
    got = m.compute_metrics(spec("multiple_choice", 4), None, labels, scores)
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(labels, scores.argmax(1)))
    reg = m.compute_metrics(spec("similarity", 1), None, scores[:, 0], scores[:, 0] * 2 + 1)
    assert reg["pearson"] == pytest.approx(1.0) and reg["spearman"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs preds or scores"):
        m.compute_metrics(spec("classification"), None, labels)


def test_unlabelled_cannot_be_scored():
    with pytest.raises(ValueError, match="1 examples have no label"):
        m.compute_metrics(spec("classification"), [0, 1], [NO_LABEL, 1])
    with pytest.raises(ValueError, match="no score"):
        m.compute_metrics(spec("similarity", 1), [0.0, 1.0], [math.nan, 1.0])


def test_majority_baseline():
    counts = {0: 3, 1: 7}
    assert m.majority_class(counts) == 1 and m.majority_class({0: 5, 1: 5, 2: 1}) == 0
    base = m.majority_baseline(counts, spec("classification"))
    labels = [0] * 3 + [1] * 7
    assert base == {"accuracy": pytest.approx(0.7), "f1": pytest.approx(sk.f1_score(labels, [1] * 10)), "mcc": 0.0}
    on_valid = m.majority_baseline(counts, spec("classification"), labels=[0, 0, 1, 0])
    assert on_valid["accuracy"] == pytest.approx(0.25)
    assert m.majority_baseline({0: 1, 1: 2, 2: 9}, spec("multiple_choice", 3)) == {"accuracy": pytest.approx(0.75)}
    assert m.majority_baseline({}, spec("similarity", 1)) == {"pearson": 0.0, "spearman": 0.0}
    with pytest.raises(ValueError, match="no labelled examples"):
        m.majority_baseline({0: 0, 1: 0}, spec("classification"))
