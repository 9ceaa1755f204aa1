"""Weighted k-nearest-neighbour evaluation of a frozen encoder (DINO's protocol).

Features of a labelled memory bank and of labelled queries are L2-normalised;
each query takes the ``k`` most cosine-similar bank entries, weights their
votes by ``exp(sim / T)`` and predicts the class with the largest total.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
import webdataset as wds
from torch import nn

from pretrain.data.codec import decode_sample
from pretrain.data.errors import DataError
from pretrain.data.stream import expand_shards
from pretrain.models.encoder import eval_mode


def iter_labelled_samples(spec: str | list[str]) -> Iterator[dict]:
    """Every labelled sample of a shard set, in shard order (no shuffling, no splitting)."""
    urls = expand_shards(spec)
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    for raw in dataset:
        sample = decode_sample(raw)
        if sample["label"] is None:
            raise DataError(f"{sample['__url__']}: sample {sample['__key__']!r} has no label; kNN needs labelled shards")
        yield sample


Featurize = Callable[[torch.Tensor], dict[str, torch.Tensor]]


@torch.no_grad()
def map_over_ranks(items: list, batch_size: int, run: Callable[[list], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``run`` over ``items`` in batches, the work shared by the ranks; every rank gets all results.

    Rank r takes ``items[r::world]``; results come back concatenated in rank
    order (rank 0's items, then rank 1's, ...: :func:`split_order`). Every rank
    makes the same number of calls (ZeRO-3 gathers parameters collectively),
    repeating a batch where it has fewer and dropping what that returns.
    """
    if not items:
        raise ValueError("nothing to evaluate: no items")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    mine = items[rank::world]
    calls = math.ceil(math.ceil(len(items) / world) / batch_size)
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(calls):
        chunk = mine[i * batch_size : (i + 1) * batch_size]
        named = run(chunk or mine[-1:] or items[:1])
        if chunk:
            for name, t in named.items():
                parts.setdefault(name, []).append(t.cpu())
    out = {name: torch.cat(ts) for name, ts in parts.items()}
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, out)
        names = next(g for g in gathered if g).keys()
        out = {n: torch.cat([g[n] for g in gathered if g]) for n in names}
    return out


def split_order(n: int) -> list[int]:
    """The item index of each row :func:`map_over_ranks` returns."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return [i for r in range(world) for i in range(r, n, world)]


@torch.no_grad()
def extract_features(
    featurize: Featurize,
    spec: str | list[str],
    view: Callable[[dict], torch.Tensor],
    *,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({name: features N x F float32}, labels N) on every rank; ranks share the forward work.

    ``featurize`` maps a batch of views to named feature sets (e.g. class token
    and mean patch token from one forward); see :func:`map_over_ranks`.
    """
    samples = list(iter_labelled_samples(spec))
    if not samples:
        raise ValueError(f"no samples in {spec!r}")
    return labelled_features(featurize, samples, view, batch_size=batch_size, device=device, dtype=dtype)


def labelled_features(featurize: Featurize, samples: list[dict], view: Callable[[dict], torch.Tensor], *,
                      batch_size: int, device: torch.device, dtype: torch.dtype = torch.float32,
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`extract_features` of samples already read."""
    def run(chunk: list[dict]) -> dict[str, torch.Tensor]:
        x = torch.stack([view(s) for s in chunk]).to(device=device, dtype=dtype)
        named = {name: f.float() for name, f in featurize(x).items()}
        return {**named, LABELS: torch.tensor([int(s["label"]) for s in chunk], dtype=torch.long)}

    out = map_over_ranks(samples, batch_size, run)
    return out, out.pop(LABELS)


LABELS = "__labels__"  # the labels' entry among the named features of map_over_ranks


def encoder_features(encoder: nn.Module, pools=("cls", "mean")) -> Featurize:
    """A featurizer for a frozen encoder: each pooling of one forward (in eval mode)."""
    def featurize(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with eval_mode(encoder):
            tokens = encoder.forward_features(x)
        return {p: encoder.pool(tokens, p) for p in pools}
    return featurize


def knn_predict(
    bank_NF: torch.Tensor, bank_labels: torch.Tensor, query_QF: torch.Tensor, *, k: int = 20,
    temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024,
) -> torch.Tensor:
    """Predicted class per query by temperature-weighted kNN voting over cosine similarity."""
    bank = F.normalize(bank_NF.float(), dim=1)
    query = F.normalize(query_QF.float(), dim=1)
    num_classes = num_classes or int(bank_labels.max()) + 1
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, query.shape[0], chunk):
        sim = query[start : start + chunk] @ bank.T
        top_sim, top_idx = sim.topk(k, dim=1)
        # Shift by the best similarity: a common factor per query, so the vote is
        # unchanged, but exp() cannot overflow at small temperatures.
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes).scatter_add_(1, bank_labels[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(
    encoder: nn.Module, bank_spec, query_spec, view, *, pool: str, k: int, temperature: float,
    batch_size: int, device: torch.device, dtype: torch.dtype = torch.float32,
) -> float:
    """Top-1 accuracy in [0, 1] of weighted kNN on the frozen encoder's ``pool`` features."""
    featurize = encoder_features(encoder, (pool,))
    bank, bank_y = extract_features(featurize, bank_spec, view, batch_size=batch_size, device=device, dtype=dtype)
    query, query_y = extract_features(featurize, query_spec, view, batch_size=batch_size, device=device, dtype=dtype)
    return knn_top1(bank[pool], bank_y, query[pool], query_y, k=k, temperature=temperature)


def knn_top1(bank_NF, bank_y, query_QF, query_y, *, k: int, temperature: float) -> float:
    num_classes = int(max(bank_y.max(), query_y.max())) + 1
    pred = knn_predict(bank_NF, bank_y, query_QF, k=k, temperature=temperature, num_classes=num_classes)
    return float((pred == query_y).float().mean())
