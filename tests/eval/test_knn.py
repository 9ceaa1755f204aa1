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


def _map_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from pretrain.eval.knn import map_over_ranks, split_order

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        calls = []

        def run(chunk):
            calls.append(len(chunk))
            return {"x": torch.tensor(chunk, dtype=torch.float64)[:, None] * 10}

        got = map_over_ranks(list(range(5)), 2, run)  # rank 0: [0, 2], [4]; rank 1: [1, 3], then a padding call
        torch.save({"x": got["x"], "order": split_order(5), "calls": calls}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_map_over_ranks_shares_work_and_gives_every_rank_all_rows_in_split_order(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_map_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    order = [0, 2, 4, 1, 3]
    for r in results:  # every rank has every row, once (the padding call's result is dropped)
        assert r["order"] == order and r["x"][:, 0].tolist() == [10.0 * i for i in order]
        assert r["calls"] == [2, 1]  # equal call counts: ZeRO-3 gathers parameters collectively
