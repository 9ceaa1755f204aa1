"""Uncertainty of evaluation metrics: bootstrap intervals, paired comparisons, DeLong's test.

A benchmark number without an interval cannot say whether two encoders differ, and
medical test sets are small. The tools here:

- ``bootstrap_ci``: percentile bootstrap interval of every metric a function of row
  indices returns. With ``groups`` (patient keys) whole patients are resampled
  (cluster bootstrap): a patient's studies are correlated, and resampling rows as if
  independent would make the interval too narrow.
- ``paired_bootstrap``: two encoders scored on the same resampled rows, so their
  difference is judged against its own variability (much smaller than either's when
  the encoders err on the same hard cases), with a two-sided bootstrap p-value.
- ``delong_test`` / ``delong_ci``: DeLong, DeLong & Clarke-Pearson (1988) variance of
  AUROCs (two correlated ones for the test), in Sun & Xu's (2014) midrank form,
  O(N log N). Analytic, so no resampling, but row-level only (no patient grouping).

The metric functions take row indices with repeats; ``pretrain.eval.metrics.subset_metric_fn``
makes such a function that costs O(N) per call.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Callable, Hashable, Sequence

import numpy as np

MetricFn = Callable[[np.ndarray], dict[str, float]]


def _check(n: int, n_boot: int, level: float) -> None:
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def _resampler(n: int, groups: Sequence[Hashable] | None, rng: np.random.Generator) -> Callable[[], np.ndarray]:
    """A function drawing one bootstrap sample of row indices: n rows, or as many groups as there are, with replacement."""
    if groups is None:
        return lambda: rng.integers(0, n, size=n)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group keys for {n} rows")
    codes: dict[Hashable, int] = {}
    code = np.fromiter((codes.setdefault(g, len(codes)) for g in groups), dtype=np.int64, count=n)
    rows = np.argsort(code, kind="stable")  # rows of group 0, then of group 1, ...
    size = np.bincount(code, minlength=len(codes))
    start = np.cumsum(size) - size

    def draw() -> np.ndarray:
        picked = rng.integers(0, len(codes), size=len(codes))
        lens = size[picked]
        # position of each output row within its picked group, plus that group's start in `rows`
        offset = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        return rows[np.repeat(start[picked], lens) + offset]

    return draw


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of the finite values (NaN, NaN when there are none)."""
    if values.size == 0:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high)


def _replicates(fns: Sequence[MetricFn], names: Sequence[str], draw: Callable[[], np.ndarray], n_boot: int) -> list[np.ndarray]:
    """(n_boot, len(names)) metric values of each function, all on the same resampled rows; NaN where missing."""
    out = [np.full((n_boot, len(names)), np.nan) for _ in fns]
    for b in range(n_boot):
        idx = draw()
        for table, fn in zip(out, fns):
            values = fn(idx)
            table[b] = [values.get(name, np.nan) for name in names]
    return out


def bootstrap_ci(
    metric_fn: MetricFn,
    n: int,
    *,
    groups: Sequence[Hashable] | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Point estimate and percentile bootstrap interval of every metric ``metric_fn(idx)`` returns.

    ``metric_fn`` gets row indices (with repeats) into the n evaluation rows; the point
    estimate is on ``np.arange(n)``. Replicates where a metric is NaN (an AUROC of a
    resample with one class) are left out of its interval, and then its entry says how
    many were used in ``n_used``.
    """
    _check(n, n_boot, level)
    point = metric_fn(np.arange(n))
    names = list(point)
    (table,) = _replicates([metric_fn], names, _resampler(n, groups, np.random.default_rng(seed)), n_boot)
    out: dict[str, dict[str, float]] = {}
    for j, name in enumerate(names):
        finite = table[:, j][~np.isnan(table[:, j])]
        low, high = _interval(finite, level)
        out[name] = {"value": float(point[name]), "low": low, "high": high}
        if finite.size < n_boot:
            out[name]["n_used"] = int(finite.size)
    return out


def paired_bootstrap(
    metric_a: MetricFn,
    metric_b: MetricFn,
    n: int,
    *,
    groups: Sequence[Hashable] | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Difference b - a of two encoders' metrics on the same rows, its bootstrap interval and two-sided p-value.

    Both functions see the same resampled indices each replicate. The p-value is twice
    the smaller tail of the bootstrap distribution of the difference beyond 0,
    ``(1 + count) / (1 + replicates)`` so that it is never exactly 0, capped at 1.
    Metrics only one function returns are skipped; NaN replicates as in ``bootstrap_ci``.
    """
    _check(n, n_boot, level)
    full = np.arange(n)
    point_a, point_b = metric_a(full), metric_b(full)
    names = [name for name in point_a if name in point_b]
    draw = _resampler(n, groups, np.random.default_rng(seed))
    table_a, table_b = _replicates([metric_a, metric_b], names, draw, n_boot)
    diffs = table_b - table_a
    out: dict[str, dict[str, float]] = {}
    for j, name in enumerate(names):
        d = diffs[:, j][~np.isnan(diffs[:, j])]
        low, high = _interval(d, level)
        if d.size:
            below, above = np.count_nonzero(d <= 0), np.count_nonzero(d >= 0)
            p = min(1.0, 2 * (1 + min(below, above)) / (1 + d.size))
        else:
            p = float("nan")
        a, b = float(point_a[name]), float(point_b[name])
        out[name] = {"a": a, "b": b, "diff": b - a, "low": low, "high": high, "p": p}
        if d.size < n_boot:
            out[name]["n_used"] = int(d.size)
    return out


def _vector(x: Any) -> np.ndarray:
    """A float64 vector from a torch tensor, array or list."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, tied values sharing the mean of their ranks."""
    _, group, count = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(count)  # the rank of the last member of each tie group
    return (last - (count - 1) / 2)[group.reshape(-1)]


def _delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUROCs (K,) of the K score rows and their structural components V10 (K, m) over positives, V01 (K, n) over negatives.

    V10[k, i] is the fraction of negatives positive i outranks (ties 1/2), V01[k, j] the
    fraction of positives outranking negative j; both from midranks (Sun & Xu 2014): the
    rank of a positive among all rows minus its rank among positives counts the
    negatives below it.
    """
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    v10, v01 = np.empty((len(scores), m)), np.empty((len(scores), n))
    for k, s in enumerate(scores):
        r_all = _midranks(s)
        v10[k] = (r_all[pos] - _midranks(s[pos])) / n
        v01[k] = 1 - (r_all[neg] - _midranks(s[neg])) / m
    return v10.mean(axis=1), v10, v01


def _delong_covariance(y: Any, scores: Sequence[Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """AUROCs and their (K, K) DeLong covariance, or None when a class has fewer than two rows."""
    y = _vector(y)
    s = np.stack([_vector(x) for x in scores])
    if s.shape[1] != y.shape[0]:
        raise ValueError(f"scores of length {s.shape[1]} for {y.shape[0]} labels")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if min(int((y == 1).sum()), int((y == 0).sum())) < 2:  # a covariance needs two rows of each class
        return None
    auc, v10, v01 = _delong_components(y, s)
    cov = np.atleast_2d(np.cov(v10)) / v10.shape[1] + np.atleast_2d(np.cov(v01)) / v01.shape[1]
    return auc, cov


def delong_ci(y: Any, s: Any, level: float = 0.95) -> dict[str, float]:
    """AUROC with its DeLong standard error and normal interval (clipped to [0, 1]); NaN with fewer than two of a class."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    res = _delong_covariance(y, [s])
    if res is None:
        return dict.fromkeys(("auc", "se", "low", "high"), float("nan"))
    auc, cov = float(res[0][0]), res[1]
    se = math.sqrt(max(float(cov[0, 0]), 0.0))
    half = NormalDist().inv_cdf((1 + level) / 2) * se
    return {"auc": auc, "se": se, "low": max(0.0, auc - half), "high": min(1.0, auc + half)}


def delong_test(y: Any, s_a: Any, s_b: Any, level: float = 0.95) -> dict[str, float]:
    """DeLong's test of two correlated AUROCs on the same rows: diff = auc_b - auc_a, its SE, z, two-sided p, interval."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    res = _delong_covariance(y, [s_a, s_b])
    if res is None:
        return dict.fromkeys(("auc_a", "auc_b", "diff", "se", "z", "p", "low", "high"), float("nan"))
    (auc_a, auc_b), cov = res
    diff = float(auc_b - auc_a)
    # rounding can leave a hair below 0 when the scorers agree; the variance of a difference is not negative
    se = math.sqrt(max(float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), 0.0))
    if se > 0:
        z = diff / se
    else:  # identical (or rank-equivalent) scorers: no variability, so no evidence unless the AUROCs differ
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
    half = NormalDist().inv_cdf((1 + level) / 2) * se
    return {
        "auc_a": float(auc_a),
        "auc_b": float(auc_b),
        "diff": diff,
        "se": se,
        "z": z,
        "p": math.erfc(abs(z) / math.sqrt(2)),  # 2 * (1 - Phi(|z|))
        "low": diff - half,
        "high": diff + half,
    }
