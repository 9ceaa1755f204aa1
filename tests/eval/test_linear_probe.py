"""The linear probe: converged logistic regressions, choices made on training data only."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.eval.linear import fit_logistic, linear_probe


def _blobs(n: int, dims: int, classes: int, separation: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dims, generator=g) * separation
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, dims, generator=g), y


def test_each_fit_is_the_optimum_of_its_own_regularised_loss():
    x, y = _blobs(200, 6, 3, 1.0, 0)
    wds = [1e-4, 1e-2, 1.0]
    W, b = fit_logistic(x, y, 3, wds)
    for g, wd in enumerate(wds):
        Wg, bg = W[g].clone().requires_grad_(True), b[g].clone().requires_grad_(True)
        loss = F.cross_entropy(x.double() @ Wg + bg, y) + wd * Wg.pow(2).sum()
        grads = torch.autograd.grad(loss, [Wg, bg])
        assert max(float(t.abs().max()) for t in grads) < 1e-5  # stationary: the convex optimum
    # fitted together or alone: the same solution
    W1, b1 = fit_logistic(x, y, 3, [1e-2])
    assert torch.allclose(W1[0], W[1], atol=1e-3) and torch.allclose(b1[0], b[1], atol=1e-3)
    # stronger regularisation, smaller weights
    norms = W.pow(2).sum((1, 2))
    assert norms[0] > norms[1] > norms[2]


def test_probe_separates_informative_features_and_not_noise():
    x, y = _blobs(600, 16, 4, 2.0, 1)
    noise = torch.randn(600, 16, generator=torch.Generator().manual_seed(2))
    train = {"signal": x[:400], "noise": noise[:400]}
    test = {"signal": x[400:], "noise": noise[400:]}
    result = linear_probe(train, y[:400], test, y[400:])
    assert result.features == "signal" and result.accuracy > 0.9
    alone = linear_probe({"noise": noise[:400]}, y[:400], {"noise": noise[400:]}, y[400:])
    assert alone.accuracy < 0.4  # 4 classes: chance is 0.25


def test_test_labels_never_influence_the_choice():
    x, y = _blobs(500, 8, 4, 0.7, 3)
    train, test = {"a": x[:300], "b": x[:300, :4]}, {"a": x[300:], "b": x[300:, :4]}
    honest = linear_probe(train, y[:300], test, y[300:])
    shuffled = linear_probe(train, y[:300], test, y[300:][torch.randperm(200, generator=torch.Generator().manual_seed(0))])
    assert (honest.features, honest.weight_decay, honest.selection_accuracy) == \
           (shuffled.features, shuffled.weight_decay, shuffled.selection_accuracy)
    assert honest.accuracy > shuffled.accuracy
