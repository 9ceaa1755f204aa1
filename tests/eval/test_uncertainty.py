"""Bootstrap intervals, paired comparisons and DeLong's test against known answers and direct computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from pretrain.eval.metrics import subset_metric_fn
from pretrain.eval.uncertainty import bootstrap_ci, delong_ci, delong_test, paired_bootstrap


def _mean_of(x: np.ndarray, name: str = "accuracy"):
    return lambda idx: {name: float(x[idx].mean())}


def _scored(seed: int, n: int = 200, tie_decimals: int | None = 1):
    """Labels and two scorers of different strength, correlated through shared noise; rounded for ties."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(int)
    shared = rng.normal(size=n)
    s_a = shared + rng.normal(size=n) + 0.6 * y
    s_b = shared + 0.5 * rng.normal(size=n) + 1.2 * y
    if tie_decimals is not None:
        s_a, s_b = np.round(s_a, tie_decimals), np.round(s_b, tie_decimals)
    return y, s_a, s_b


# ---------------------------------------------------------------- DeLong


def _delong_reference(y: np.ndarray, scorers: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs and their covariance straight from DeLong et al.'s definition, O(N^2) pairwise kernels."""
    aucs, v10s, v01s = [], [], []
    for s in scorers:
        x, z = s[y == 1], s[y == 0]  # positives, negatives
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])  # (m, n) pair kernel
        aucs.append(psi.sum() / psi.size)
        v10s.append(psi.sum(axis=1) / psi.shape[1])  # one per positive
        v01s.append(psi.sum(axis=0) / psi.shape[0])  # one per negative
    aucs = np.array(aucs)
    K, m, n = len(scorers), len(v10s[0]), len(v01s[0])
    cov = np.zeros((K, K))
    for k in range(K):
        for l in range(K):
            s10 = sum((v10s[k][i] - aucs[k]) * (v10s[l][i] - aucs[l]) for i in range(m)) / (m - 1)
            s01 = sum((v01s[k][j] - aucs[k]) * (v01s[l][j] - aucs[l]) for j in range(n)) / (n - 1)
            cov[k, l] = s10 / m + s01 / n
    return aucs, cov


@pytest.mark.parametrize("seed,decimals", [(0, 1), (1, 1), (2, None), (3, 0)])
def test_delong_variance_matches_the_direct_structural_components(seed, decimals):
    y, s_a, s_b = _scored(seed, n=150, tie_decimals=decimals)
    aucs, cov = _delong_reference(y, [s_a, s_b])
    res = delong_test(y, s_a, s_b)
    assert res["auc_a"] == pytest.approx(roc_auc_score(y, s_a), abs=1e-12)
    assert res["auc_b"] == pytest.approx(roc_auc_score(y, s_b), abs=1e-12)
    assert res["diff"] == pytest.approx(aucs[1] - aucs[0], abs=1e-12)
    se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert res["se"] == pytest.approx(se, rel=1e-9)
    assert res["z"] == pytest.approx((aucs[1] - aucs[0]) / se, rel=1e-9)
    assert res["p"] == pytest.approx(2 * norm.sf(abs(res["z"])), rel=1e-9)
    assert res["low"] == pytest.approx(res["diff"] - norm.ppf(0.975) * se, rel=1e-9)
    single = delong_ci(y, s_a, level=0.9)
    assert single["auc"] == pytest.approx(aucs[0], abs=1e-12)
    assert single["se"] == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-9)
    assert single["high"] == pytest.approx(min(1.0, aucs[0] + norm.ppf(0.95) * single["se"]), rel=1e-9)


def test_delong_identical_scores_give_p_one_and_a_clearly_better_scorer_a_small_p():
    y, s_a, s_b = _scored(5, n=300)
    same = delong_test(y, s_a, s_a.copy())
    assert same["diff"] == 0 and same["se"] == 0 and same["p"] == 1.0
    assert delong_test(y, s_a, np.exp(s_a))["p"] == 1.0  # a monotone transform ranks the same
    rng = np.random.default_rng(6)
    noise = rng.normal(size=300)
    better = delong_test(torch.tensor(y), torch.tensor(noise), torch.tensor(noise + 2.0 * y))
    assert better["auc_b"] > better["auc_a"] + 0.3 and better["p"] < 1e-6 and better["low"] > 0
    worse = delong_test(y, noise + 2.0 * y, noise)
    assert worse["diff"] == pytest.approx(-better["diff"]) and worse["p"] == pytest.approx(better["p"])


def test_delong_nan_without_two_of_each_class():
    assert all(math.isnan(v) for v in delong_test([0, 0, 0, 1], [1, 2, 3, 4], [4, 3, 2, 1]).values())
    assert all(math.isnan(v) for v in delong_ci([1, 1, 1], [1, 2, 3]).values())


# ---------------------------------------------------------------- bootstrap_ci


def test_percentile_interval_covers_near_nominal():
    """300 simulated test sets of 200 Bernoulli(0.7) correct/incorrect: the 90% interval covers 0.7 in 85-95%."""
    rng = np.random.default_rng(0)
    correct = (rng.random((300, 200)) < 0.7).astype(np.float64)
    covered = 0
    for e, c in enumerate(correct):
        ci = bootstrap_ci(_mean_of(c), 200, n_boot=300, level=0.9, seed=e)["accuracy"]
        assert ci["value"] == c.mean() and ci["low"] <= ci["value"] <= ci["high"]
        covered += ci["low"] <= 0.7 <= ci["high"]
    assert 0.85 <= covered / 300 <= 0.95


def test_bootstrap_is_deterministic_for_a_seed():
    c = (np.random.default_rng(1).random(100) < 0.6).astype(float)
    assert bootstrap_ci(_mean_of(c), 100, n_boot=200, seed=3) == bootstrap_ci(_mean_of(c), 100, n_boot=200, seed=3)
    assert bootstrap_ci(_mean_of(c), 100, n_boot=200, seed=3) != bootstrap_ci(_mean_of(c), 100, n_boot=200, seed=4)


def test_cluster_bootstrap_widens_with_correlated_rows_and_matches_rows_for_singletons():
    rng = np.random.default_rng(2)
    n_patients, per = 100, 5
    patient_correct = (rng.random(n_patients) < 0.7).astype(float)
    perm = rng.permutation(n_patients * per)  # a patient's rows are scattered, not contiguous
    patient = np.repeat(np.arange(n_patients), per)[perm]
    c = patient_correct[patient]  # rows of one patient are all right or all wrong
    keys = [f"patient-{p}" for p in patient]

    def width(ci):
        return ci["high"] - ci["low"]

    draws = []

    def record(idx):
        draws.append(idx)
        return {"accuracy": float(c[idx].mean())}

    rows = bootstrap_ci(_mean_of(c), len(c), n_boot=2000, level=0.9, seed=0)["accuracy"]
    clustered = bootstrap_ci(record, len(c), groups=keys, n_boot=2000, level=0.9, seed=0)["accuracy"]
    assert rows["value"] == clustered["value"] == c.mean()
    # perfectly correlated groups of 5 carry the information of 100 rows, not 500: about sqrt(5) wider
    assert 1.8 < width(clustered) / width(rows) < 2.7
    # each cluster replicate takes whole patients, as many as there are
    for idx in draws[1:20]:
        counts = np.bincount(idx, minlength=len(c))
        per_patient = np.bincount(patient, weights=counts, minlength=n_patients) / per
        assert np.array_equal(counts, per_patient[patient]) and per_patient.sum() == n_patients
    singletons = bootstrap_ci(_mean_of(c), len(c), groups=list(range(len(c))), n_boot=2000, level=0.9, seed=1)
    assert width(singletons["accuracy"]) == pytest.approx(width(rows), rel=0.1)
    with pytest.raises(ValueError):
        bootstrap_ci(_mean_of(c), len(c), groups=keys[:-1])


def test_nan_replicates_are_dropped_and_counted():
    y = np.array([1] + [0] * 11)
    s = np.linspace(0, 1, 12)[::-1].copy()
    fn = subset_metric_fn("multi", y[:, None], s[:, None], names=["finding"])
    draws = []

    def record(idx):
        draws.append(idx)
        return fn(idx)

    out = bootstrap_ci(record, 12, n_boot=200, seed=0)
    has_positive = sum(bool((y[idx] == 1).any()) for idx in draws[1:])
    assert 0 < has_positive < 200
    ci = out["auroc/finding"]
    assert ci["n_used"] == has_positive and ci["value"] == 1.0 and ci["low"] == ci["high"] == 1.0
    assert out["auprc/finding"]["n_used"] == has_positive
    none = bootstrap_ci(lambda idx: {"m": float("nan")}, 5, n_boot=10)
    assert none["m"]["n_used"] == 0 and math.isnan(none["m"]["low"])
    assert "n_used" not in bootstrap_ci(_mean_of(s), 12, n_boot=50)["accuracy"]  # nothing dropped, nothing said


# ---------------------------------------------------------------- paired_bootstrap


def test_paired_identical_encoders_have_p_one_and_a_clearly_better_one_p_below_001():
    rng = np.random.default_rng(3)
    a = (rng.random(400) < 0.6).astype(float)
    b = (rng.random(400) < 0.85).astype(float)
    same = paired_bootstrap(_mean_of(a), _mean_of(a.copy()), 400, n_boot=500, seed=0)["accuracy"]
    assert same["diff"] == 0 and same["low"] == same["high"] == 0 and same["p"] == 1.0
    res = paired_bootstrap(_mean_of(a), _mean_of(b), 400, n_boot=500, seed=0)["accuracy"]
    assert res["a"] == a.mean() and res["b"] == b.mean() and res["diff"] == b.mean() - a.mean()
    assert res["p"] < 0.01 and res["p"] > 0  # the +1 correction: at least 2 / (1 + n_boot)
    assert res["low"] < res["diff"] < res["high"] and res["low"] > 0
    flipped = paired_bootstrap(_mean_of(b), _mean_of(a), 400, n_boot=500, seed=0)["accuracy"]
    assert flipped["diff"] == -res["diff"] and flipped["p"] == res["p"]


def test_paired_encoders_see_the_same_rows_and_a_noisy_difference_is_not_significant():
    rng = np.random.default_rng(4)
    a = (rng.random(300) < 0.7).astype(float)
    b = a.copy()
    flip = rng.choice(300, size=6, replace=False)
    b[flip] = 1 - b[flip]  # a few disagreements, as many right as wrong on average
    seen: dict[str, list[np.ndarray]] = {"a": [], "b": []}

    def spy(x, key):
        def fn(idx):
            seen[key].append(idx.copy())
            return {"accuracy": float(x[idx].mean()), f"only_{key}": 0.0}

        return fn

    groups = np.arange(300) // 3
    out = paired_bootstrap(spy(a, "a"), spy(b, "b"), 300, groups=groups, n_boot=300, seed=1)
    assert list(out) == ["accuracy"]  # metrics only one encoder reports are skipped
    assert len(seen["a"]) == len(seen["b"]) == 301
    assert all(np.array_equal(x, y) for x, y in zip(seen["a"], seen["b"]))
    assert out["accuracy"]["p"] > 0.2


def test_paired_bootstrap_auroc_difference_agrees_with_delong():
    y, s_a, s_b = _scored(7, n=300)
    fa = subset_metric_fn("multi", y[:, None], s_a[:, None], names=["x"])
    fb = subset_metric_fn("multi", y[:, None], s_b[:, None], names=["x"])
    boot = paired_bootstrap(fa, fb, 300, n_boot=1000, seed=0)["auroc/x"]
    dl = delong_test(y, s_a, s_b)
    assert boot["diff"] == pytest.approx(dl["diff"], abs=1e-12)
    # the percentile interval's half-width is about 1.96 DeLong standard errors
    assert (boot["high"] - boot["low"]) / (2 * norm.ppf(0.975)) == pytest.approx(dl["se"], rel=0.2)
    assert (boot["p"] < 0.05) == (dl["p"] < 0.05)
