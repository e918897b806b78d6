"""Task metrics: accuracy, F1, Matthews correlation, Pearson and Spearman, chosen per task.

Written with numpy rather than imported from scikit-learn/scipy because the library does
not depend on them (they are test-only dependencies, and the tests check that every
function here equals ``sklearn.metrics`` / ``scipy.stats`` on the same predictions). The
definitions and edge cases follow theirs:

* ``f1``: F1 of ``pos_label`` (binary) or the unweighted mean over the classes present in
  the labels or the predictions (``average="macro"``, scikit-learn's default class set); a
  class with no true or predicted member scores 0 (scikit-learn's ``zero_division``).
* ``matthews_corrcoef``: the multi-class form (Gorodkin 2004) from the confusion matrix;
  0 when it is undefined (constant predictions or labels), as scikit-learn returns.
* ``pearson`` / ``spearman``: nan on a constant input, as scipy returns; Spearman ranks
  ties by their average rank. :func:`compute_metrics` reports 0 instead for constant
  predictions or labels (no information, the same convention as MCC), so that choosing the best
  checkpoint never compares with nan.

Arguments are ``(preds, labels)``; every metric is higher-is-better.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from gpt_dist.finetune.tasks import NO_LABEL, TaskSpec


def _pair(preds: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds).reshape(-1), np.asarray(labels).reshape(-1)
    if len(p) != len(y):
        raise ValueError(f"{len(p)} predictions for {len(y)} labels")
    if len(p) == 0:
        raise ValueError("no predictions to score")
    return p, y


def accuracy(preds: Any, labels: Any) -> float:
    """Fraction of predictions equal to their label."""
    p, y = _pair(preds, labels)
    return float(np.mean(p == y))


def _f1_of(p: np.ndarray, y: np.ndarray, c: Any) -> float:
    tp = int(np.sum((p == c) & (y == c)))
    fp = int(np.sum((p == c) & (y != c)))
    fn = int(np.sum((p != c) & (y == c)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def f1(preds: Any, labels: Any, average: Literal["binary", "macro"] = "binary", pos_label: int = 1) -> float:
    """F1 of class ``pos_label`` (binary), or the macro average over the classes seen."""
    p, y = _pair(preds, labels)
    if average == "binary":
        return _f1_of(p, y, pos_label)
    if average != "macro":
        raise ValueError(f"f1: average must be 'binary' or 'macro', got {average!r}")
    return float(np.mean([_f1_of(p, y, c) for c in np.unique(np.concatenate([p, y]))]))


def matthews_corrcoef(preds: Any, labels: Any) -> float:
    """Matthews correlation, multi-class; 0 when undefined."""
    p, y = _pair(preds, labels)
    _, idx = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = int(idx.max()) + 1
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (idx[:len(y)], idx[len(y):]), 1.0)
    t_sum, p_sum = conf.sum(axis=1), conf.sum(axis=0)
    n, correct = conf.sum(), np.trace(conf)
    cov_tp = correct * n - t_sum @ p_sum
    cov_pp, cov_tt = n * n - p_sum @ p_sum, n * n - t_sum @ t_sum
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / math.sqrt(cov_tt * cov_pp))


def pearson(x: Any, y: Any) -> float:
    """Pearson's r; nan when either input is constant (scipy's ``pearsonr``)."""
    a, b = (v.astype(np.float64) for v in _pair(x, y))
    if len(a) < 2:
        raise ValueError("pearson: needs at least 2 values")
    if np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan
    am, bm = a - a.mean(), b - b.mean()
    r = float(np.dot(am / np.linalg.norm(am), bm / np.linalg.norm(bm)))
    return max(-1.0, min(1.0, r))


def rankdata(x: Any) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (scipy's ``rankdata(method="average")``)."""
    a = np.asarray(x).reshape(-1)
    order = np.argsort(a, kind="mergesort")
    inv = np.empty(len(a), dtype=np.intp)
    inv[order] = np.arange(len(a))
    s = a[order]
    first = np.concatenate([[True], s[1:] != s[:-1]])
    dense = np.cumsum(first)[inv]
    bounds = np.concatenate([np.nonzero(first)[0], [len(a)]])
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def spearman(x: Any, y: Any) -> float:
    """Spearman's rho: Pearson's r of the average ranks; nan on a constant input."""
    a, b = _pair(x, y)
    return pearson(rankdata(a), rankdata(b))


def metric_names(spec: TaskSpec) -> tuple[str, ...]:
    """The metrics :func:`compute_metrics` reports for ``spec`` (the first is the default
    for choosing the best checkpoint)."""
    if spec.regression:
        return ("pearson", "spearman")
    if spec.task == "multiple_choice":
        return ("accuracy",)
    f1_name = "f1" if spec.num_labels == 2 else "f1_macro"
    return ("accuracy", f1_name) if spec.task == "similarity" else ("accuracy", f1_name, "mcc")


def compute_metrics(task_spec: TaskSpec, preds: Sequence[Any] | np.ndarray | None, labels: Sequence[Any] | np.ndarray,
                    scores: Sequence[Any] | np.ndarray | None = None) -> dict[str, float]:
    """The task's metrics (:func:`metric_names`) of predictions against labels.

    ``preds``: predicted classes (choice index for multiple choice) or predicted values
    (regression). ``scores`` may stand in for them: per-class/per-choice scores [N, C]
    (``preds`` then defaults to their argmax) or, for regression, the predicted values.
    Unlabelled examples (:data:`~gpt_dist.finetune.tasks.NO_LABEL`, nan) cannot be scored
    and raise ``ValueError``.
    """
    if preds is None:
        if scores is None:
            raise ValueError("compute_metrics: needs preds or scores")
        s = np.asarray(scores, dtype=np.float64)
        preds = s.reshape(-1) if task_spec.regression else np.argmax(s.reshape(len(s), -1), axis=-1)
    p, y = _pair(preds, labels)
    if task_spec.regression:
        y = y.astype(np.float64)
        if np.isnan(y).any():
            raise ValueError(f"compute_metrics: {int(np.isnan(y).sum())} examples have no score")
        if np.all(p == p[0]) or np.all(y == y[0]):  # undefined: no correlation (module docstring)
            return {"pearson": 0.0, "spearman": 0.0}
        return {"pearson": pearson(p, y), "spearman": spearman(p, y)}
    if np.any(y == NO_LABEL):
        raise ValueError(f"compute_metrics: {int(np.sum(y == NO_LABEL))} examples have no label")
    fns = {"accuracy": accuracy, "f1": f1, "mcc": matthews_corrcoef,
           "f1_macro": lambda a, b: f1(a, b, average="macro")}
    return {name: float(fns[name](p, y)) for name in metric_names(task_spec)}


def majority_class(label_counts: Mapping[int, int]) -> int:
    """The most frequent class (the smallest index among equals, so it is deterministic)."""
    if not label_counts or max(label_counts.values()) <= 0:
        raise ValueError("majority_class: no labelled examples")
    return min(label_counts, key=lambda c: (-label_counts[c], c))


def majority_baseline(label_counts: Mapping[int, int], task_spec: TaskSpec,
                      labels: Sequence[Any] | np.ndarray | None = None) -> dict[str, float]:
    """The metrics of always predicting the majority class of ``label_counts`` (usually
    the training set's ``TaskStats.label_counts``), scored on ``labels`` (e.g. the
    validation labels) or, without them, on the distribution ``label_counts`` itself.

    A regression task's constant predictor scores 0 (no correlation).
    """
    if task_spec.regression:
        return {"pearson": 0.0, "spearman": 0.0}
    cls = majority_class(label_counts)
    if labels is None:
        labels = [c for c, n in sorted(label_counts.items()) for _ in range(n)]
    return compute_metrics(task_spec, [cls] * len(labels), labels)
