"""Weighted kNN against a brute-force reference written another way."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pretrain.eval.knn import knn_predict


def reference_knn(bank, bank_y, query, k, T, C):
    """Plain-Python DINO voting: sort all similarities, sum exp(sim/T) per class over the top k."""
    preds = []
    for q in query:
        sims = [float(np.dot(q, b) / (np.linalg.norm(q) * np.linalg.norm(b))) for b in bank]
        order = sorted(range(len(bank)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * C
        for i in order:
            votes[int(bank_y[i])] += math.exp(sims[i] / T)
        preds.append(int(np.argmax(votes)))
    return preds


@pytest.mark.parametrize("k,T", [(1, 0.07), (5, 0.07), (20, 0.5)])
def test_knn_matches_reference(k, T):
    rng = np.random.default_rng(0)
    bank, query = rng.normal(size=(60, 8)), rng.normal(size=(25, 8))
    bank_y = rng.integers(0, 4, size=60)
    got = knn_predict(torch.tensor(bank), torch.tensor(bank_y), torch.tensor(query), k=k, temperature=T, num_classes=4, chunk=7)
    assert got.tolist() == reference_knn(bank, bank_y, query, k, T, 4)


def test_knn_separable_clusters_are_classified_and_temperature_weights_votes():
    # Query sits next to one class-1 point but among many slightly farther class-0 points.
    bank = torch.tensor([[1.0, 0.0]] + [[math.cos(0.3), math.sin(0.3)]] * 3)
    bank_y = torch.tensor([1, 0, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_predict(bank, bank_y, query, k=4, temperature=0.01).item() == 1  # sharp: nearest wins
    assert knn_predict(bank, bank_y, query, k=4, temperature=10.0).item() == 0  # flat: majority wins
