"""Evaluation metrics against scikit-learn on random data, and on subsets of rows as the bootstrap uses them."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)

from pretrain.eval.metrics import (
    auroc,
    classification_metrics,
    metrics_for,
    multilabel_metrics,
    subset_metric_fn,
)

SEEDS = [0, 1, 2, 3, 4]


def _sklearn_single(y: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    pred = scores.argmax(axis=1)
    return {
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "macro_f1": f1_score(y, pred, average="macro", zero_division=0),
    }


def _imbalanced(seed: int, n: int = 300, prior=(0.55, 0.25, 0.1, 0.07, 0.03)) -> tuple[np.ndarray, np.ndarray]:
    """Labels from an imbalanced prior and scores that favour the true class, noisily."""
    rng = np.random.default_rng(seed)
    y = rng.choice(len(prior), size=n, p=prior)
    scores = rng.normal(size=(n, len(prior)))
    scores[np.arange(n), y] += 1.0
    return y, scores


@pytest.mark.parametrize("seed", SEEDS)
def test_classification_matches_sklearn_with_imbalance_and_a_class_never_predicted(seed):
    y, scores = _imbalanced(seed)
    scores[:, 3] = -1e9  # class 3 occurs in y but is never predicted: recall 0, F1 0 (0/0 for precision)
    assert 3 in y and 3 not in scores.argmax(axis=1)
    ours = classification_metrics(y, scores)
    ref = _sklearn_single(y, scores)
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name] == pytest.approx(ref[name], abs=1e-12), name


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", SEEDS)
def test_classes_predicted_but_absent_from_y_true_and_classes_never_seen(seed):
    rng = np.random.default_rng(100 + seed)
    n, C = 120, 6
    y = rng.choice(3, size=n)  # classes 3..5 never true
    scores = rng.normal(size=(n, C))
    scores[:, 5] = -1e9  # class 5 neither true nor predicted: excluded from macro F1
    scores[: n // 4, 4] = 10.0  # class 4 predicted, never true: F1 0, no recall to average
    ours = classification_metrics(y, scores)
    ref = _sklearn_single(y, scores)
    for name in ref:
        assert ours[name] == pytest.approx(ref[name], abs=1e-12), name
    # with class 5 counted as an F1 of 0 the macro mean would be lower: it is excluded
    pred = scores.argmax(axis=1)
    with_5 = f1_score(y, pred, labels=list(range(C)), average="macro", zero_division=0)
    assert ours["macro_f1"] > with_5


def test_classification_accepts_torch_and_perfect_predictions():
    y = torch.tensor([0, 1, 2, 2, 1])
    scores = torch.nn.functional.one_hot(y, 4).float()
    assert classification_metrics(y, scores) == {"accuracy": 1.0, "balanced_accuracy": 1.0, "macro_f1": 1.0}
    with pytest.raises(ValueError):
        classification_metrics(torch.tensor([0, 4]), torch.zeros(2, 4))  # label out of range


@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_matches_sklearn_with_ties_and_imbalance(seed):
    rng = np.random.default_rng(200 + seed)
    n = 400
    y = (rng.random(n) < [0.5, 0.1, 0.03, 0.3, 0.8][seed]).astype(int)
    s = np.round(rng.normal(size=n) + 0.8 * y, 1)  # one decimal: many tied scores, across classes too
    assert len(np.unique(s)) < n / 2
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auroc(torch.tensor(y), torch.tensor(s)) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_exact_values_and_nan_when_a_class_is_absent():
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auroc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts 1/2
    assert math.isnan(auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    # on a subset holding only negatives
    assert math.isnan(auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], idx=np.array([0, 1, 1])))
    with pytest.raises(ValueError):
        auroc([0, 1], [0.1, float("nan")])


@pytest.mark.parametrize("seed", SEEDS)
def test_multilabel_matches_sklearn_per_finding_and_macro(seed):
    rng = np.random.default_rng(300 + seed)
    n, L = 250, 5
    prevalence = np.array([0.5, 0.2, 0.05, 0.3, 0.0])  # the last finding has no positive
    y = (rng.random((n, L)) < prevalence).astype(int)
    scores = np.round(rng.normal(size=(n, L)) + y, 1)
    names = ["effusion", "edema", "nodule", "cardiomegaly", "hernia"]
    ours = multilabel_metrics(y, scores, names=names)
    for j, name in enumerate(names[:-1]):
        assert ours[f"auroc/{name}"] == pytest.approx(roc_auc_score(y[:, j], scores[:, j]), abs=1e-12)
        assert ours[f"auprc/{name}"] == pytest.approx(average_precision_score(y[:, j], scores[:, j]), abs=1e-12)
    assert math.isnan(ours["auroc/hernia"]) and math.isnan(ours["auprc/hernia"])
    # macro means over the findings with both classes, which here is sklearn's macro over them
    assert ours["auroc_macro"] == pytest.approx(roc_auc_score(y[:, :-1], scores[:, :-1], average="macro"), abs=1e-12)
    assert ours["auprc_macro"] == pytest.approx(
        average_precision_score(y[:, :-1], scores[:, :-1], average="macro"), abs=1e-12
    )


def test_multilabel_default_names_and_shape_checks():
    y = np.array([[0, 1], [1, 0], [1, 1], [0, 0]])
    s = np.array([[0.1, 0.9], [0.8, 0.2], [0.7, 0.6], [0.2, 0.1]])
    out = multilabel_metrics(y, s)
    assert out["auroc/0"] == 1.0 and out["auroc/1"] == 1.0 and out["auroc_macro"] == 1.0
    with pytest.raises(ValueError):
        multilabel_metrics(y, s[:, :1])
    with pytest.raises(ValueError):
        multilabel_metrics(y, s, names=["a"])
    with pytest.raises(ValueError):
        multilabel_metrics(y * 2, s)  # targets not 0/1


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_subset_rows_with_repeats_equal_the_metrics_of_the_indexed_rows(seed):
    """What the bootstrap relies on: fn(idx) is the metric of y[idx], scores[idx], repeats included."""
    rng = np.random.default_rng(400 + seed)
    y, scores = _imbalanced(seed, n=200)
    single = subset_metric_fn("single", y, scores)
    ym = (rng.random((200, 3)) < [0.4, 0.1, 0.25]).astype(int)
    sm = np.round(rng.normal(size=(200, 3)) + ym, 1)
    multi = subset_metric_fn("multi", ym, sm, names=["a", "b", "c"])
    for _ in range(5):
        idx = rng.integers(0, 200, size=200)
        got, ref = single(idx), _sklearn_single(y[idx], scores[idx])
        for name in ref:
            assert got[name] == pytest.approx(ref[name], abs=1e-12), name
        got = multi(idx)
        for j, name in enumerate("abc"):
            assert got[f"auroc/{name}"] == pytest.approx(roc_auc_score(ym[idx, j], sm[idx, j]), abs=1e-12)
            assert got[f"auprc/{name}"] == pytest.approx(average_precision_score(ym[idx, j], sm[idx, j]), abs=1e-12)
        assert auroc(ym[:, 0], sm[:, 0], idx=idx) == pytest.approx(roc_auc_score(ym[idx, 0], sm[idx, 0]), abs=1e-12)
    with pytest.raises(IndexError):
        single(np.array([0, 200]))


def test_metrics_for_dispatches_on_task():
    y, scores = _imbalanced(0, n=100)
    assert metrics_for("single", y, scores) == classification_metrics(y, scores)
    ym = (scores > 0).astype(int)
    assert metrics_for("multi", ym, scores, names=list("abcde")) == multilabel_metrics(ym, scores, names=list("abcde"))
    idx = np.arange(50)
    assert metrics_for("single", y, scores, idx=idx) == classification_metrics(y[:50], scores[:50])
    with pytest.raises(ValueError):
        metrics_for("regression", y, scores)
