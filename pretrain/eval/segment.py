"""Linear dense probe on frozen patch tokens: per-class Dice and IoU of a 1x1-convolution segmentation head.

The head is DINOv2's "linear" dense probe: each token of the encoder's output
grid, standardised with training statistics, is mapped linearly to
``num_classes`` logits; the logit maps are upsampled (bilinear in 2D, trilinear
in 3D, ``align_corners=False``) to the label map's resolution and trained with
plain, unweighted pixel-wise cross-entropy (the standard protocol; no class
balancing, so small structures count by their pixel share)::

    mean_pixels CE(up(W z + b), mask) + wd * ||W||^2,    z = (x - mu_train) / sd_train

The problem is convex in (W, b), so it is fitted with full-batch L-BFGS, as
the classification probe (:mod:`pretrain.eval.linear`) is: no learning rate or
schedule to tune. All weight decays of the grid train together as one batched
problem; the loss is accumulated over mini-batches of images so that the
upsampled logits (images x classes x pixels) never have to exist at once.
The weight decay is chosen by mean foreground Dice on a held-out fraction of
the *training* images; it is refitted on all training images and scored once
on the evaluation set, which never influences a choice.

Scores are aggregated over the whole evaluation set (intersections and sizes
summed over images, then divided). Per-image, per-class counts come back too,
so that a bootstrap over images can recompute the aggregate on a resampled set
(:func:`dice_iou_from_stats`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.eval.linear import WEIGHT_DECAYS

# Upsampled logits per mini-batch (images x weight decays x classes x pixels), in elements:
# ~64 MiB of float32, a few times that with the autograd buffers.
CHUNK_ELEMENTS = 2**24


@dataclass
class SegmentStats:
    """Per-image, per-class pixel counts, (N, K) int64 each: all the aggregate metrics need."""

    intersection: np.ndarray  # pixels predicted k where the label is k
    predicted: np.ndarray  # pixels predicted k
    target: np.ndarray  # pixels labelled k
    class_names: tuple[str, ...]


@dataclass
class SegmentResult:
    dice: dict[str, float]  # per class (background included), on the evaluation set
    iou: dict[str, float]
    mean_dice: float  # over the foreground classes 1..K-1 (background 0 excluded)
    mean_iou: float
    pixel_accuracy: float
    weight_decay: float  # the chosen L2 strength
    selection_dice: dict[float, float]  # weight decay -> mean foreground Dice on the held-out training images
    stats: SegmentStats  # of the evaluation images, for bootstraps
    predictions: np.ndarray | None = None  # (N, *spatial) uint8 label maps, if asked for


def dice_iou_from_stats(stats: SegmentStats, idx: Sequence[int] | np.ndarray | None = None) -> dict[str, float]:
    """Aggregate Dice / IoU of the images ``idx`` (repeats allowed, as in a bootstrap; None: all).

    Keys: ``dice/<class>``, ``iou/<class>``, ``mean_dice``, ``mean_iou`` (foreground classes only)
    and ``pixel_accuracy``. A class absent from both labels and predictions of the set has an undefined
    score (NaN), left out of the means.
    """
    n = stats.target.shape[0]
    sel = slice(None) if idx is None else np.asarray(idx, dtype=np.int64).reshape(-1)
    if idx is not None and sel.size and (sel.min() < 0 or sel.max() >= n):  # numpy would wrap negatives silently
        raise IndexError(f"image indices must lie in [0, {n})")
    inter, pred, true = (a[sel].sum(0).astype(np.float64) for a in (stats.intersection, stats.predicted, stats.target))
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2 * inter / (pred + true)
        iou = inter / (pred + true - inter)
    out = {}
    for k, name in enumerate(stats.class_names):
        out[f"dice/{name}"], out[f"iou/{name}"] = float(dice[k]), float(iou[k])
    out["mean_dice"], out["mean_iou"] = _mean_defined(dice[1:]), _mean_defined(iou[1:])
    out["pixel_accuracy"] = float(inter.sum() / true.sum()) if true.sum() else math.nan
    return out


def segmentation_stats(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                       class_names: Sequence[str] | None = None) -> SegmentStats:
    """Per-image counts of integer label maps ``pred`` and ``target``, both (N, *spatial)."""
    inter, p, t = _counts(pred[:, None], target, num_classes)
    names = _names(num_classes, class_names)
    return SegmentStats(inter[:, 0].numpy(), p[:, 0].numpy(), t[:, 0].numpy(), names)


def segment_probe(
    train_tokens: torch.Tensor, train_masks: torch.Tensor, val_tokens: torch.Tensor, val_masks: torch.Tensor,
    *, num_classes: int, weight_decays: Sequence[float] = WEIGHT_DECAYS, max_iter: int = 100,
    selection_fraction: float = 0.2, seed: int = 0, class_names: Sequence[str] | None = None,
    device: str | torch.device | None = None, chunk_elements: int = CHUNK_ELEMENTS,
    return_predictions: bool = False,
) -> SegmentResult:
    """Fit the linear dense probe on ``train_*``, the weight decay chosen on held-out training images; score on ``val_*``.

    Tokens are (N, *grid, D), any float dtype (computed in float32); masks are integer (N, *spatial)
    with values in 0..num_classes-1, at any resolution (the logits are interpolated to it). ``max_iter``
    bounds the L-BFGS iterations (each a pass or two over the training pixels). ``device``: where to
    compute (default: that of ``train_tokens``).
    """
    names = _names(num_classes, class_names)
    device = torch.device(device) if device is not None else train_tokens.device
    sets = [_check(t, m, num_classes, device) for t, m in ((train_tokens, train_masks), (val_tokens, val_masks))]
    (x_train, m_train), (x_val, m_val) = sets
    n = x_train.shape[0]
    if n < 2:
        raise ValueError("the segmentation probe needs at least two training images (one to hold out)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    n_sel = min(n - 1, max(1, int(round(n * selection_fraction))))
    sel, fit = order[:n_sel], order[n_sel:]

    wds = list(weight_decays)
    head = _fit(x_train, m_train, fit, num_classes, wds, max_iter, chunk_elements)
    inter, p, t, _ = _evaluate(x_train, m_train, sel, head, chunk_elements)
    scores = []
    for g in range(len(wds)):
        s = SegmentStats(inter[:, g].numpy(), p[:, g].numpy(), t[:, g].numpy(), names)
        scores.append(dice_iou_from_stats(s)["mean_dice"])
    ranked = [-math.inf if math.isnan(s) else s for s in scores]
    best = int(np.argmax(ranked))  # ties: the first, i.e. the weakest regularisation of the tie

    everything = torch.arange(n, device=device)
    head = _fit(x_train, m_train, everything, num_classes, [wds[best]], max_iter, chunk_elements)
    inter, p, t, preds = _evaluate(x_val, m_val, torch.arange(x_val.shape[0], device=device), head, chunk_elements,
                                   keep_predictions=return_predictions)
    stats = SegmentStats(inter[:, 0].numpy(), p[:, 0].numpy(), t[:, 0].numpy(), names)
    agg = dice_iou_from_stats(stats)
    return SegmentResult(
        dice={c: agg[f"dice/{c}"] for c in names}, iou={c: agg[f"iou/{c}"] for c in names},
        mean_dice=agg["mean_dice"], mean_iou=agg["mean_iou"], pixel_accuracy=agg["pixel_accuracy"],
        weight_decay=wds[best], selection_dice=dict(zip(wds, scores)), stats=stats,
        predictions=preds.numpy().astype(np.uint8) if preds is not None else None,
    )


# ----------------------------------------------------------------------------------------------------------------------

@dataclass
class _Head:
    """Standardisation and weights of one batch of G probes: W (D, G, C), b (G, C)."""

    mean: torch.Tensor
    std: torch.Tensor
    W: torch.Tensor
    b: torch.Tensor


def _names(num_classes: int, class_names: Sequence[str] | None) -> tuple[str, ...]:
    if num_classes < 2:
        raise ValueError("num_classes must be at least 2 (background and one foreground class)")
    names = tuple(class_names) if class_names is not None else tuple(str(k) for k in range(num_classes))
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    return names


def _check(tokens: torch.Tensor, masks: torch.Tensor, num_classes: int, device: torch.device):
    if tokens.dim() < 3 or masks.dim() != tokens.dim() - 1 or masks.shape[0] != tokens.shape[0]:
        raise ValueError(f"tokens (N, *grid, D) and masks (N, *spatial) do not match: {tuple(tokens.shape)}, "
                         f"{tuple(masks.shape)}")
    if tokens.shape[0] == 0:
        raise ValueError("no images")
    if masks.dtype.is_floating_point or masks.dtype == torch.bool:
        raise TypeError(f"masks must be integer label maps, not {masks.dtype}")
    if masks.numel() and (int(masks.min()) < 0 or int(masks.max()) >= num_classes):
        raise ValueError(f"mask values must lie in 0..{num_classes - 1}")
    return tokens.to(device), masks.to(device, torch.long)


def _interpolation_matrix(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """(n_out, n_in): 1-D linear interpolation with align_corners=False, as F.interpolate does it.

    Bi-/trilinear interpolation is this along each axis in turn. As matrix products its backward pass
    is deterministic, which F.interpolate's is not on CUDA (atomic adds).
    """
    eye = torch.eye(n_in, device=device).view(n_in, 1, n_in)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0].T.contiguous()


def _upsampled_logits(x: torch.Tensor, head: _Head, mats: list[torch.Tensor]) -> torch.Tensor:
    """(n, G, C, *spatial) logits of tokens x (n, *grid, D)."""
    n, grid, D = x.shape[0], x.shape[1:-1], x.shape[-1]
    z = (x.float().reshape(n, -1, D) - head.mean) / head.std
    G, C = head.b.shape
    logits = (torch.einsum("npd,dgc->ngcp", z, head.W) + head.b[:, :, None]).reshape(n, G * C, *grid)
    for axis, A in enumerate(mats):  # the weights of each output pixel sum to one, so the bias passes through
        logits = (logits.movedim(2 + axis, -1) @ A.T).movedim(-1, 2 + axis)
    return logits.reshape(n, G, C, *logits.shape[2:])


def _chunks(idx: torch.Tensor, per_image: int, chunk_elements: int):
    step = max(1, chunk_elements // max(1, per_image))
    return [idx[i : i + step] for i in range(0, len(idx), step)]


def _feature_stats(x: torch.Tensor, idx: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of every feature over the tokens of images ``idx`` (float64 sums)."""
    D = x.shape[-1]
    s = torch.zeros(D, dtype=torch.float64, device=x.device)
    s2, count = torch.zeros_like(s), 0
    for part in idx.split(chunk):
        v = x[part].reshape(-1, D).double()
        s, s2, count = s + v.sum(0), s2 + v.pow(2).sum(0), count + v.shape[0]
    mean = s / count
    std = (s2 / count - mean.pow(2)).clamp_min(0).sqrt()
    return mean.float(), std.float().clamp_min(1e-6)


def _fit(x: torch.Tensor, masks: torch.Tensor, idx: torch.Tensor, num_classes: int, weight_decays: list[float],
         max_iter: int, chunk_elements: int) -> _Head:
    """One probe per weight decay, fitted together on images ``idx`` (their losses separate, so summing them is exact)."""
    device, D, G, C = x.device, x.shape[-1], len(weight_decays), num_classes
    mean, std = _feature_stats(x, idx)
    W = torch.zeros(D, G, C, device=device, requires_grad=True)
    b = torch.zeros(G, C, device=device, requires_grad=True)
    head = _Head(mean, std, W, b)
    wd = torch.tensor(weight_decays, dtype=torch.float32, device=device)
    spatial = masks.shape[1:]
    mats = [_interpolation_matrix(g, s, device) for g, s in zip(x.shape[1:-1], spatial)]
    pixels = len(idx) * math.prod(spatial)
    parts = _chunks(idx, G * C * math.prod(spatial), chunk_elements)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-9,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        total = torch.zeros((), device=device)
        for part in parts:  # gradients accumulate over the mini-batches: the full-batch gradient
            logits = _upsampled_logits(x[part], head, mats)
            target = F.one_hot(masks[part], C).movedim(-1, 1).unsqueeze(1).float()  # (n, 1, C, *spatial)
            # CE summed over pixels, per weight decay; a one-hot product rather than a gather, whose backward
            # is a scatter-add (non-deterministic on CUDA)
            nll = (logits.logsumexp(2) - (logits * target).sum(2)).sum() / pixels
            nll.backward()
            total = total + nll.detach()
        reg = (wd * W.pow(2).sum((0, 2))).sum()
        reg.backward()
        return total + reg.detach()

    opt.step(closure)
    return _Head(mean, std, W.detach(), b.detach())


@torch.no_grad()
def _counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int):
    """Intersection, predicted and target sizes, (n, G, K) int64 each, of pred (n, G, *S) against target (n, *S)."""
    pred, target = pred.flatten(2), target.flatten(1)[:, None]
    inter, p, t = [], [], []
    for k in range(num_classes):
        pk, tk = pred == k, target == k
        inter.append((pk & tk).sum(-1))
        p.append(pk.sum(-1))
        t.append(tk.sum(-1).expand(-1, pred.shape[1]))
    return tuple(torch.stack(c, -1).long().cpu() for c in (inter, p, t))


@torch.no_grad()
def _evaluate(x: torch.Tensor, masks: torch.Tensor, idx: torch.Tensor, head: _Head, chunk_elements: int,
              keep_predictions: bool = False):
    """Counts (n, G, K) of the probes' argmax predictions on images ``idx``, and those predictions if asked (G = 1)."""
    G, C = head.b.shape
    spatial = masks.shape[1:]
    mats = [_interpolation_matrix(g, s, x.device) for g, s in zip(x.shape[1:-1], spatial)]
    counts, preds = [], []
    for part in _chunks(idx, G * C * math.prod(spatial), chunk_elements):
        pred = _upsampled_logits(x[part], head, mats).argmax(2)
        counts.append(_counts(pred, masks[part], C))
        if keep_predictions:
            preds.append(pred[:, 0].cpu())
    inter, p, t = (torch.cat(c) for c in zip(*counts))
    return inter, p, t, (torch.cat(preds) if keep_predictions else None)


def _mean_defined(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else math.nan
