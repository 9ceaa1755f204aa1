"""Frozen-feature evaluation beside its baselines: kNN on the class token and on mean patch tokens, and a
linear probe, for pretrained encoders, the same architecture at random init, and raw pixels.

A representation counts only where it beats both baselines on held-out data:
raw pixels (the evaluation view averaged down to the encoder's output grid,
so they get as many numbers per image as there are patches), and the
random-init encoder (which already scores above chance through its
architecture alone). kNN on the class token alone can hide learning that sits
in the patch tokens (a collapsed class token) or fake it; the linear probe
reads past a common direction. Every number is top-1 accuracy on the
held-out set; the probe's choices are made on the training set only
(``pretrain.eval.linear``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from pretrain.eval.knn import Featurize, encoder_features, extract_features, knn_top1
from pretrain.eval.linear import linear_probe


@dataclass
class FrozenEvalData:
    """The labelled sets and how to read them."""

    train: str | list[str]  # the kNN bank and the probe's training set
    val: str | list[str]  # the held-out queries
    view: Callable[[dict], torch.Tensor]
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 64
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32


def pixel_features(grid: tuple[int, ...]) -> Featurize:
    """Raw pixels averaged down to ``grid`` (the encoder's patch / feature grid), flattened."""
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(grid)]

    def featurize(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixels": pool(x.float(), tuple(grid)).flatten(1)}
    return featurize


def evaluate_features(featurize: Featurize, data: FrozenEvalData, probe_sets: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """``knn_<set>`` for each feature set of ``featurize`` and ``linear`` (+ its choices) over ``probe_sets``
    (name -> feature sets concatenated; default: each set alone)."""
    kw = dict(batch_size=data.batch_size, device=data.device, dtype=data.dtype)
    train, y_train = extract_features(featurize, data.train, data.view, **kw)
    val, y_val = extract_features(featurize, data.val, data.view, **kw)
    result: dict[str, Any] = {
        f"knn_{name}": knn_top1(train[name], y_train, val[name], y_val, k=data.k, temperature=data.temperature)
        for name in train
    }
    probe_sets = probe_sets or {name: [name] for name in train}
    probe = linear_probe({n: torch.cat([train[p] for p in parts], 1) for n, parts in probe_sets.items()}, y_train,
                         {n: torch.cat([val[p] for p in parts], 1) for n, parts in probe_sets.items()}, y_val)
    result.update(linear=probe.accuracy, linear_features=probe.features, linear_weight_decay=probe.weight_decay)
    return result


ENCODER_PROBE_SETS = {"cls": ["cls"], "mean": ["mean"], "cls+mean": ["cls", "mean"]}


def evaluate_encoder(encoder, data: FrozenEvalData, pool: str | None = None) -> dict[str, Any]:
    """kNN on the class token and on mean patch tokens (and on ``pool``, the method's own reading, as
    ``knn``), and a linear probe choosing among cls, mean and both."""
    pools = ["cls", "mean"] + ([pool] if pool and pool not in ("cls", "mean") else [])
    result = evaluate_features(encoder_features(encoder, pools), data, ENCODER_PROBE_SETS)
    result["knn"] = result[f"knn_{pool or 'cls'}"]
    return result


def evaluate_pixels(grid: tuple[int, ...], data: FrozenEvalData) -> dict[str, Any]:
    """The raw-pixel baseline: kNN and a linear probe on the view averaged down to ``grid``."""
    result = evaluate_features(pixel_features(grid), data)
    result["knn"] = result.pop("knn_pixels")
    return result


def evaluate_baselines(random_encoder, data: FrozenEvalData, pool: str | None = None, pixels: bool = True) -> dict[str, Any]:
    """``random_init`` (the architecture before training) and, with ``pixels``, ``raw_pixels`` on its output grid."""
    baselines = {"random_init": evaluate_encoder(random_encoder, data, pool)}
    if pixels:
        baselines["raw_pixels"] = evaluate_pixels(random_encoder.grid_size(), data)
    return baselines


def best_knn(result: dict[str, Any]) -> float:
    return max(v for k, v in result.items() if k.startswith("knn") and isinstance(v, float))


def gains(pretrained: dict[str, Any], baselines: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Points by which ``pretrained`` beats the better baseline, for the linear probe and for kNN (best reading)."""
    if not baselines:
        return {}
    return {
        "linear": pretrained["linear"] - max(b["linear"] for b in baselines.values()),
        "knn": best_knn(pretrained) - max(best_knn(b) for b in baselines.values()),
    }
