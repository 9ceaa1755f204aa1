"""Collapse indicators of a batch of embeddings, cheap enough to log at every logged step.

For features X (B, D) of one batch:

- ``std``: the mean over dimensions of the per-dimension standard deviation of
  the L2-normalised rows. About 1/sqrt(D) for features spread over the sphere,
  0 when every sample maps to one point (SimSiam's indicator).
- ``cosine``: the mean cosine similarity over pairs of different samples; near 1
  when all features point one way (the failure a kNN on such features hides
  least well, and a linear probe can still read past).
- ``rank``: the effective rank of the centred features (Roy & Vetterli, 2007):
  exp(entropy of the singular values normalised to sum 1), between 1 (one
  direction carries everything) and min(B, D).

For probabilities P (B, K) over prototypes (self-distillation targets and
predictions), as fractions of ln K:

- ``entropy``: the mean per-sample entropy. 1 when every sample's
  distribution is uniform: DINO's collapse to uniform, where the loss sits at
  ln K and the student has stopped predicting the teacher (the case the
  embedding indicators above can miss: KoLeo keeps the class tokens spread).
- ``marginal_entropy``: the entropy of the batch's mean distribution. 0 when
  every sample picks the same prototype (collapse to one prototype); near 1
  when confident samples spread over the prototypes, as wanted.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of distributions along the last axis; 0 log 0 = 0."""
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


@torch.no_grad()
def collapse_stats(x_BD: torch.Tensor) -> dict[str, float]:
    x = x_BD.detach().float()
    if x.shape[0] < 2:
        return {}
    z = F.normalize(x, dim=1)
    B = z.shape[0]
    gram = z @ z.T
    cosine = (gram.sum() - gram.diagonal().sum()) / (B * (B - 1))
    s = torch.linalg.svdvals(x - x.mean(0))
    s = s[s > 1e-6 * float(x.abs().max()) * max(x.shape) ** 0.5]  # rounding noise is not a direction
    total = s.sum()
    if s.numel() == 0 or not torch.isfinite(total):
        rank = torch.tensor(1.0)
    else:
        p = s / total
        rank = torch.exp(_entropy(p))
    return {"std": float(z.std(0).mean()), "cosine": float(cosine), "rank": float(rank)}


@torch.no_grad()
def distribution_stats(p_BK: torch.Tensor) -> dict[str, float]:
    p = p_BK.detach().float()
    if p.shape[1] < 2 or p.shape[0] < 1:
        return {}
    log_k = math.log(p.shape[1])
    return {"entropy": float(_entropy(p).mean() / log_k), "marginal_entropy": float(_entropy(p.mean(0)) / log_k)}


def embedding_scalars(outputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """``collapse/<tower>/<kind>/<stat>`` for every ``_embed/<tower>/<kind>`` (B, D) features and every
    ``_dist/<tower>/<kind>`` (B, K) probabilities an objective's forward returned."""
    stats = {"_embed/": collapse_stats, "_dist/": distribution_stats}
    scalars = {}
    for key, value in outputs.items():
        prefix = key[:key.find("/") + 1]
        if prefix in stats and torch.is_tensor(value) and value.dim() == 2:
            name = key[len(prefix):]
            scalars.update({f"collapse/{name}/{stat}": v for stat, v in stats[prefix](value).items()})
    return scalars
