"""Aggregates and standard errors exactly as lm-evaluation-harness computes them
(``lm_eval/api/metrics.py`` at 0.4.x):

* ``mean`` (acc, acc_norm): stderr = sample standard deviation / sqrt(n);
* ``perplexity`` = exp(-mean(ll)) (LAMBADA): stderr by bootstrap, lm-eval's draws replayed:
  chunk ``i`` of ``min(1000, iters)`` resamples uses ``random.Random(i).choices(xs, k=n)``.
  NumPy's legacy ``RandomState([i])`` is the same Mersenne Twister seeded the same way
  (``init_by_array``) and its ``random_sample`` is Python's ``random()``, so
  ``floor(u * n)`` picks the same items, vectorised (lm-eval loops in Python);
* ``weighted_perplexity`` = exp(-sum(ll) / sum(units)) and ``bits_per_byte`` =
  -sum(ll) / sum(bytes) / ln 2 (rolling perplexity): lm-eval has no stderr for them (None).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if len(xs) else float("nan")


def mean_stderr(xs: Sequence[float]) -> float | None:
    n = len(xs)
    if n < 2:
        return None
    mu = mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def perplexity(lls: Sequence[float]) -> float:
    return math.exp(-mean(lls)) if len(lls) else float("nan")


def perplexity_stderr(lls: Sequence[float], iters: int = 100_000) -> float | None:
    """lm-eval's ``bootstrap_stderr(perplexity, lls, iters)`` (module docstring)."""
    n = len(lls)
    if iters <= 0 or n == 0:
        return None
    xs = np.asarray(lls, dtype=np.float64)
    chunk = min(1000, iters)
    res = []
    for i in range(iters // chunk):
        u = np.random.RandomState([i]).random_sample((chunk, n))
        res.append(np.exp(-xs[np.floor(u * n).astype(np.int64)].mean(axis=1)))
    draws = np.concatenate(res)
    if len(draws) < 2:
        return None
    return float(np.std(draws, ddof=1))


def weighted_perplexity(lls: Sequence[float], units: Sequence[float]) -> float:
    return math.exp(-sum(lls) / sum(units)) if sum(units) else float("nan")


def bits_per_byte(lls: Sequence[float], n_bytes: Sequence[float]) -> float:
    return -sum(lls) / sum(n_bytes) / math.log(2) if sum(n_bytes) else float("nan")
