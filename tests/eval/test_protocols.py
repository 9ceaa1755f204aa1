"""kNN, linear probe and few-shot on synthetic features with known answers; choices never see the report set."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.eval import protocols as P
from pretrain.eval.features import FeatureSet


def _blobs(n, dims, classes, separation, seed, noise_dims=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dims, generator=torch.Generator().manual_seed(99)) * separation
    y = torch.arange(n) % classes
    x = centres[y] + torch.randn(n, dims, generator=g)
    feats = {"signal": x, "noise": torch.randn(n, max(dims, noise_dims), generator=g)}
    return FeatureSet(feats, y, [f"k{seed}_{i}" for i in range(n)])


def _roles(separation=3.0, classes=4):
    return P.assign_roles(_blobs(400, 8, classes, separation, 0), _blobs(200, 8, classes, separation, 1))


def _value(pred, metric="accuracy"):
    return pred.metric_fn(np.arange(pred.n))[metric]


def test_roles_hold_out_a_fifth_of_train_without_a_test_set_and_use_val_with_one():
    train, val, test = _blobs(100, 4, 4, 1, 0), _blobs(50, 4, 4, 1, 1), _blobs(30, 4, 4, 1, 2)
    roles = P.assign_roles(train, val)
    assert len(roles.select) == 20 and len(roles.fit) == 80 and roles.report is val and roles.report_name == "val"
    assert not set(roles.fit.keys) & set(roles.select.keys) and set(roles.pool.keys) == set(train.keys)
    roles = P.assign_roles(train, val, test)
    assert (roles.fit, roles.select, roles.report, roles.report_name) == (train, val, test, "test")


def test_knn_reads_signal_not_noise_and_its_scores_are_vote_shares():
    roles = _roles()
    pred = P.knn(roles, ["signal", "noise"])
    assert pred.choice["reading"] == "signal" and _value(pred) > 0.95
    noise = P.knn(roles, ["noise"])
    assert _value(noise) < 0.4  # chance 0.25
    s = P.knn_scores(roles.fit.features["signal"], roles.fit.labels, roles.report.features["signal"], k=10, num_classes=4)
    assert torch.allclose(s.sum(1), torch.ones(len(s))) and (s >= 0).all()


def test_knn_multi_label_scores_are_the_weighted_mean_of_neighbour_labels():
    bank = torch.eye(3)
    labels = torch.tensor([[1, 0], [0, 1], [1, 1]], dtype=torch.float32)
    s = P.knn_scores(bank, labels, torch.tensor([[1.0, 0.0, 0.0]]), k=1, num_classes=2, multi_label=True)
    assert torch.equal(s, torch.tensor([[1.0, 0.0]]))


def test_report_labels_never_influence_a_choice():
    roles = _roles(separation=0.8)
    shuffled = P.Roles(roles.fit, roles.select, FeatureSet(roles.report.features, roles.report.labels.flip(0),
                                                           roles.report.keys), "val")
    for proto in (lambda r: P.knn(r, ["signal", "noise"]), lambda r: P.linear(r, {"a": ["signal"], "b": ["noise"]})):
        a, b = proto(roles), proto(shuffled)
        assert a.choice == b.choice and _value(a) > _value(b)


def test_linear_probe_multi_label_reaches_high_macro_auroc():
    g = torch.Generator().manual_seed(0)
    def make(n, seed):
        x = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))
        y = torch.stack([(x[:, 0] > 0), (x[:, 1] + x[:, 2] > 0), (x[:, 3] > 0.5)], 1).float()
        return FeatureSet({"x": x, "noise": torch.randn(n, 6, generator=g)}, y, [str(i) for i in range(n)])
    roles = P.assign_roles(make(400, 1), make(200, 2))
    pred = P.linear(roles, {"x": ["x"], "noise": ["noise"]})
    m = pred.metric_fn(np.arange(pred.n))
    assert pred.choice["features"] == "x" and m["auroc_macro"] > 0.95


def test_imbalanced_classes_get_weighted_so_the_minority_is_found():
    # 95 % of class 0: an unweighted fit on weak features predicts class 0 nearly always
    g = torch.Generator().manual_seed(0)
    def make(n, seed):
        y = (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.05).long()
        x = y[:, None].float() * 1.0 + torch.randn(n, 4, generator=g)
        return FeatureSet({"x": x}, y, [str(i) for i in range(n)])
    fit = make(2000, 1)
    assert P._class_weight(fit) is not None and float(P._class_weight(fit)[1]) > 5 * float(P._class_weight(fit)[0])
    roles = P.assign_roles(fit, make(1000, 2))
    m = P.linear(roles, {"x": ["x"]}).metric_fn(np.arange(1000))
    assert m["balanced_accuracy"] > 0.65  # the minority is recalled, not traded for accuracy


def test_few_shot_draws_are_stratified_and_more_shots_do_better():
    fit = _blobs(400, 8, 4, 1.5, 0)
    for k in (1, 4):
        idx = P.few_shot_indices(fit, shots=k, seed=3)
        assert torch.bincount(fit.labels[idx], minlength=4).tolist() == [k] * 4
    assert torch.bincount(fit.labels[P.few_shot_indices(fit, fraction=0.01, seed=0)], minlength=4).min() >= 1
    assert not torch.equal(P.few_shot_indices(fit, shots=2, seed=0), P.few_shot_indices(fit, shots=2, seed=1))
    roles = P.assign_roles(fit, _blobs(200, 8, 4, 1.5, 1))
    preds = P.few_shot(roles, ["signal"], shots=(1, 16), fractions=(0.1, 1.0), seeds=3)
    assert set(preds) == {"k1", "k16", "p10", "p100"}
    assert _value(preds["k16"]) > _value(preds["k1"]) and preds["k1"].spread["accuracy"] > 0
    assert preds["p100"].choice["draws"] == 1 and preds["k1"].choice["draws"] == 3
    assert preds["k16"].choice["train_samples"] == 64


def test_k_shot_refuses_multi_label_sets():
    fs = FeatureSet({"x": torch.zeros(4, 2)}, torch.zeros(4, 3), list("abcd"))
    with pytest.raises(ValueError, match="k-shot"):
        P.few_shot_indices(fs, shots=1, seed=0)
