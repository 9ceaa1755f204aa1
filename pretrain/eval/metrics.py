"""Metrics of an evaluation's predictions, in numpy float64, with no scikit-learn dependency.

- single-label tasks (``task="single"``): ``accuracy``, ``balanced_accuracy`` (mean
  recall over the classes present in ``y_true``) and ``macro_f1`` (mean F1 over the
  classes present in ``y_true`` or predicted, 0/0 taken as 0 as scikit-learn's
  ``zero_division=0``); predictions are the argmax of the scores.
- multi-label tasks (``task="multi"``): per finding ``auroc/<name>`` and
  ``auprc/<name>`` (average precision, scikit-learn's step-wise definition), and their
  means ``auroc_macro`` / ``auprc_macro`` over the findings where they are defined.
- ``auroc``: the Mann-Whitney statistic, ties counted 1/2; NaN when a class is absent.

The bootstrap (``pretrain.eval.uncertainty``) evaluates a metric about a thousand times
on resampled rows, so every metric takes ``idx``, the rows to use (repeats allowed).
The rows enter as multiplicities (``np.bincount(idx)``) weighting every sample, which
gives exactly the metric of ``y[idx], scores[idx]`` but lets the sort that AUROC needs
be done once: ``subset_metric_fn`` prepares it and returns a function of ``idx`` that
is O(N) per call. The one-off functions below prepare and evaluate in one go.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

MetricFn = Callable[[np.ndarray | None], dict[str, float]]


def _numpy(x: Any, dtype: type) -> np.ndarray:
    """A numpy copy-or-view of a torch tensor, array or list."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _weights(idx: np.ndarray | None, n: int) -> np.ndarray:
    """Each row's multiplicity in ``idx`` (all ones for the full set)."""
    if idx is None:
        return np.ones(n)
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"row indices must lie in [0, {n})")
    return np.bincount(idx, minlength=n).astype(np.float64)


def _tie_groups(s: np.ndarray) -> tuple[np.ndarray, int]:
    """Each score's rank among the distinct scores (0 = lowest), and their number: the one sort."""
    if np.isnan(s).any():  # NaN has no place in an order; np.unique would make it one more tie group
        raise ValueError("scores contain NaN")
    uniq, group = np.unique(s, return_inverse=True)
    return group.reshape(-1), len(uniq)


def _weighted_auroc(y: np.ndarray, group: np.ndarray, n_groups: int, w: np.ndarray) -> float:
    """Mann-Whitney AUROC with row weights: P(s+ > s-) + P(s+ = s-)/2 over weighted pairs."""
    pos = np.bincount(group, weights=w * y, minlength=n_groups)
    neg = np.bincount(group, weights=w * (1.0 - y), minlength=n_groups)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg  # negatives strictly below each distinct score
    return float(np.dot(pos, neg_below + 0.5 * neg) / (n_pos * n_neg))


def _weighted_average_precision(y: np.ndarray, group: np.ndarray, n_groups: int, w: np.ndarray) -> float:
    """Average precision sum_k (R_k - R_{k-1}) P_k with one threshold per distinct score (tied rows enter together)."""
    pos = np.bincount(group, weights=w * y, minlength=n_groups)
    allw = np.bincount(group, weights=w, minlength=n_groups)
    n_pos = pos.sum()
    if n_pos == 0:
        return float("nan")
    # thresholds from the highest score down: rows at or above each distinct score are called positive
    tp = np.cumsum(pos[::-1])
    called = np.cumsum(allw[::-1])
    keep = called > 0  # distinct scores none of whose rows were drawn add no threshold
    precision = np.divide(tp, called, out=np.zeros_like(tp), where=keep)
    return float(np.dot(pos[::-1], precision) / n_pos)


class _SingleLabel:
    """Prepared single-label predictions: labels, argmax predictions, number of classes."""

    def __init__(self, y_true: Any, scores: Any) -> None:
        s = _numpy(scores, np.float64)
        y = _numpy(y_true, np.int64).reshape(-1)
        if s.ndim != 2 or s.shape[0] != y.shape[0]:
            raise ValueError(f"scores must be (N, C) with N = len(y_true); got {s.shape} for {y.shape[0]} labels")
        if y.size and (y.min() < 0 or y.max() >= s.shape[1]):
            raise ValueError(f"labels must lie in [0, {s.shape[1]})")
        self.y, self.pred, self.C = y, s.argmax(axis=1), s.shape[1]
        self.correct = (self.pred == y).astype(np.float64)

    def __call__(self, idx: np.ndarray | None = None) -> dict[str, float]:
        w = _weights(idx, self.y.shape[0])
        total = w.sum()
        if total == 0:
            return {"accuracy": float("nan"), "balanced_accuracy": float("nan"), "macro_f1": float("nan")}
        hit = w * self.correct
        true_c = np.bincount(self.y, weights=w, minlength=self.C)
        pred_c = np.bincount(self.pred, weights=w, minlength=self.C)
        tp_c = np.bincount(self.y, weights=hit, minlength=self.C)
        present = true_c > 0
        seen = present | (pred_c > 0)  # a class neither true nor predicted has no F1 to average
        # F1 = 2PR/(P+R) = 2TP/(#true + #predicted); a seen class has a nonzero denominator
        f1 = 2 * tp_c[seen] / (true_c[seen] + pred_c[seen])
        return {
            "accuracy": float(hit.sum() / total),
            "balanced_accuracy": float(np.mean(tp_c[present] / true_c[present])),
            "macro_f1": float(np.mean(f1)),
        }


class _MultiLabel:
    """Prepared multi-label predictions: 0/1 targets and each finding's tie groups (sorted once)."""

    def __init__(self, y_true: Any, scores: Any, names: Sequence[str] | None = None) -> None:
        y = _numpy(y_true, np.float64)
        s = _numpy(scores, np.float64)
        if y.ndim == 1:
            y, s = y[:, None], s.reshape(-1, 1)
        if y.ndim != 2 or s.shape != y.shape:
            raise ValueError(f"y_true and scores must both be (N, L); got {y.shape} and {s.shape}")
        if not np.all((y == 0) | (y == 1)):
            raise ValueError("multi-label targets must be 0 or 1")
        self.names = [str(i) for i in range(y.shape[1])] if names is None else [str(n) for n in names]
        if len(self.names) != y.shape[1]:
            raise ValueError(f"{len(self.names)} names for {y.shape[1]} findings")
        self.y = y
        self.groups = [_tie_groups(s[:, j]) for j in range(y.shape[1])]

    def __call__(self, idx: np.ndarray | None = None) -> dict[str, float]:
        w = _weights(idx, self.y.shape[0])
        out: dict[str, float] = {}
        aurocs, auprcs = [], []
        for j, name in enumerate(self.names):
            group, n_groups = self.groups[j]
            aurocs.append(_weighted_auroc(self.y[:, j], group, n_groups, w))
            auprcs.append(_weighted_average_precision(self.y[:, j], group, n_groups, w))
            out[f"auroc/{name}"], out[f"auprc/{name}"] = aurocs[-1], auprcs[-1]
        # macro means over the findings where each is defined (AUROC: both classes; AP: a positive)
        a, p = np.asarray(aurocs), np.asarray(auprcs)
        out["auroc_macro"] = float(a[~np.isnan(a)].mean()) if (~np.isnan(a)).any() else float("nan")
        out["auprc_macro"] = float(p[~np.isnan(p)].mean()) if (~np.isnan(p)).any() else float("nan")
        return out


def subset_metric_fn(task: str, y_true: Any, scores: Any, names: Sequence[str] | None = None) -> MetricFn:
    """Prepare once, then ``fn(idx)`` gives the task's metrics on rows ``idx`` (None: all) in O(N)."""
    if task == "single":
        return _SingleLabel(y_true, scores)
    if task == "multi":
        return _MultiLabel(y_true, scores, names)
    raise ValueError(f"task must be 'single' or 'multi', not {task!r}")


def classification_metrics(y_true: Any, scores: Any, idx: np.ndarray | None = None) -> dict[str, float]:
    """``accuracy``, ``balanced_accuracy``, ``macro_f1`` of argmax predictions; y_true (N,) ints, scores (N, C)."""
    return _SingleLabel(y_true, scores)(idx)


def auroc(y: Any, s: Any, idx: np.ndarray | None = None) -> float:
    """Area under the ROC curve of scores ``s`` for 0/1 labels ``y`` (ties 1/2); NaN if a class is absent."""
    y = _numpy(y, np.float64).reshape(-1)
    s = _numpy(s, np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"y and s must have the same length; got {y.shape[0]} and {s.shape[0]}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1")
    group, n_groups = _tie_groups(s)
    return _weighted_auroc(y, group, n_groups, _weights(idx, y.shape[0]))


def multilabel_metrics(
    y_true: Any, scores: Any, names: Sequence[str] | None = None, idx: np.ndarray | None = None
) -> dict[str, float]:
    """Per-finding ``auroc/<name>``, ``auprc/<name>`` and their macro means; y_true, scores (N, L)."""
    return _MultiLabel(y_true, scores, names)(idx)


def metrics_for(
    task: str, y_true: Any, scores: Any, names: Sequence[str] | None = None, idx: np.ndarray | None = None
) -> dict[str, float]:
    """The metrics of a ``"single"`` (classification) or ``"multi"`` (multi-label) task."""
    return subset_metric_fn(task, y_true, scores, names)(idx)
