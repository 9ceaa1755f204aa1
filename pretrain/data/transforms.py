"""CPU-side image operations shared by the objectives (2D and 3D alike).

Images are channels-first tensors ``(C, *spatial)``; every random choice comes
from an explicit ``numpy.random.Generator`` so a resumed stream reproduces the
augmentations of an uninterrupted one.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def sample_rng(sample: dict) -> np.random.Generator:
    """The augmentation RNG of one sample, seeded by the stream."""
    return np.random.default_rng(int(sample.get("__seed__", 0)))


def to_tensor(image: np.ndarray, intensity: str = "zscore") -> torch.Tensor:
    """Native-dtype array -> float32 tensor with per-image intensity normalisation.

    ``zscore``: zero mean, unit variance per channel (robust to 12-bit data in
    16-bit containers, CT offsets and MRI's arbitrary scale). ``range``: integers
    divided by their dtype maximum, floats min-max scaled to [0, 1].
    """
    if image.dtype.kind == "f" and image.dtype.itemsize > 4 and image.size:
        peak = float(np.abs(image).max())
        if peak > float(np.finfo(np.float32).max):  # inf as float32; the normalisations ignore the scale
            image = image / peak
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    if intensity == "zscore":
        dims = tuple(range(1, x.ndim))
        mean = x.mean(dim=dims, keepdim=True)
        # one value per channel has no (n - 1) std (torch gives NaN): such an image normalises to zeros
        std = x.std(dim=dims, keepdim=True) if x[0].numel() > 1 else torch.zeros_like(mean)
        return (x - mean) / std.clamp_min(1e-6)
    if intensity == "range":
        if np.issubdtype(image.dtype, np.integer):
            info = np.iinfo(image.dtype)
            return (x - info.min) / float(info.max - info.min)
        lo, hi = x.min(), x.max()
        return (x - lo) / (hi - lo).clamp_min(1e-12)
    if intensity == "none":
        return x
    raise ValueError(f"unknown intensity normalisation {intensity!r} (zscore, range, none)")


def match_channels(x: torch.Tensor, channels: int, key: str = "?") -> torch.Tensor:
    """Repeat a 1-channel image or average a multi-channel one to ``channels``."""
    c = x.shape[0]
    if c == channels:
        return x
    if c == 1:
        return x.expand(channels, *x.shape[1:]).contiguous()
    if channels == 1:
        return x.mean(dim=0, keepdim=True)
    raise ValueError(f"sample {key!r} has {c} channels; the model takes {channels} (only 1 <-> N is converted)")


def check_spatial_dims(x: torch.Tensor, spatial_dims: int, key: str = "?") -> None:
    if x.ndim - 1 != spatial_dims:
        kind = {2: "2D image (C,H,W)", 3: "3D volume (C,D,H,W)"}[spatial_dims]
        raise ValueError(f"sample {key!r} has shape {tuple(x.shape)}; the model expects a {kind}")


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize ``(C, *spatial)`` to ``size`` (bilinear 2D with antialiasing, trilinear 3D)."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[1:]) == size:
        return x
    mode = "bilinear" if len(size) == 2 else "trilinear"
    antialias = len(size) == 2 and any(s < o for s, o in zip(size, x.shape[1:]))
    return F.interpolate(x[None], size=size, mode=mode, align_corners=False, antialias=antialias)[0]


def random_resized_crop(
    x: torch.Tensor,
    size: Sequence[int],
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Crop a random box covering ``scale`` of the image with aspect ``ratio``, resize to ``size``.

    Works for any number of spatial axes: the box's volume fraction is drawn from
    ``scale``, each axis is stretched by a log-uniform factor within ``ratio``.
    Returns the crop and its box as ``[(start, stop), ...]`` per axis in input coordinates.
    """
    spatial = x.shape[1:]
    n = len(spatial)
    frac = rng.uniform(*scale)
    # Half a log-ratio per axis, centred: for 2D the aspect exp(s0 - s1) spans ``ratio`` exactly.
    stretch = rng.uniform(0.5 * math.log(ratio[0]), 0.5 * math.log(ratio[1]), size=n)
    stretch -= stretch.mean()  # keep the volume fraction; ratios act between axes
    box = []
    for axis, extent in enumerate(spatial):
        side = int(round(extent * frac ** (1.0 / n) * math.exp(stretch[axis])))
        side = min(max(side, 1), extent)
        start = int(rng.integers(0, extent - side + 1))
        box.append((start, start + side))
    crop = x[(slice(None), *[slice(a, b) for a, b in box])]
    return resize(crop, size), box


def random_flip(x: torch.Tensor, rng: np.random.Generator, axes: Sequence[int], p: float = 0.5) -> torch.Tensor:
    """Flip each listed spatial axis (0 = first spatial axis) with probability ``p``."""
    return random_flip_axes(x, rng, axes, p)[0]


def random_flip_axes(x: torch.Tensor, rng: np.random.Generator, axes: Sequence[int],
                     p: float = 0.5) -> tuple[torch.Tensor, list[int]]:
    """:func:`random_flip` that also says which spatial axes it flipped."""
    flipped = [a for a in axes if rng.random() < p]
    return (torch.flip(x, dims=[a + 1 for a in flipped]) if flipped else x), flipped


def augmented_view(sample: dict, rng: np.random.Generator, size: Sequence[int], channels: int, intensity: str,
                   crop_scale: tuple[float, float], flip_axes: Sequence[int]) -> torch.Tensor:
    """A training view of one sample: normalised, channels matched, random resized crop to ``size``, then
    random flips along ``flip_axes`` (negative axes count from the last spatial axis)."""
    key = sample["__key__"]
    x = match_channels(to_tensor(sample["image"], intensity), channels, key)
    check_spatial_dims(x, len(size), key)
    x, _ = random_resized_crop(x, size, rng, scale=tuple(crop_scale))
    return random_flip(x, rng, [a % len(size) for a in flip_axes])


def eval_view(image: np.ndarray, size: Sequence[int], channels: int, intensity: str, key: str = "?") -> torch.Tensor:
    """Deterministic view for evaluation: the whole image resized to the model's size."""
    x = match_channels(to_tensor(image, intensity), channels, key)
    check_spatial_dims(x, len(size), key)
    return resize(x, size)
