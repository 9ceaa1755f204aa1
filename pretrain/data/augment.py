"""Photometric and geometric augmentations for medical images, 2D ``(C,H,W)`` and 3D ``(C,D,H,W)``.

Natural-image recipes (colour jitter, solarisation, grayscale) assume RGB photos;
most medical data is single-channel with a physical intensity scale, so these
ops are chosen per modality. Every random choice comes from the caller's
``numpy.random.Generator`` (noise included), so a resumed stream replays the
same augmentations; each op draws its ``p`` coin first, then its parameters.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _skip(rng: np.random.Generator, p: float) -> bool:
    return rng.random() >= p


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate in the last two axes (H,W) by ``degrees``, counter-clockwise as displayed (``torch.rot90`` with k=1 at 90).

    3D volumes turn about the D axis (the axial plane for CT); D is sampled at voxel centres, so slices do not mix.
    Border padding repeats edge values: black corners would be a trivial cue for the student.
    """
    if degrees == 0.0:
        return x
    h, w = x.shape[-2:]
    a = math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    n = x.ndim - 1
    theta = torch.zeros(1, n, n + 1, dtype=x.dtype)
    theta[0, :n, :n] = torch.eye(n, dtype=x.dtype)
    # affine_grid's coordinates are normalised per axis; the H/W factors make it a true rotation on non-square images.
    theta[0, 0, 0], theta[0, 0, 1] = cos, -sin * h / w
    theta[0, 1, 0], theta[0, 1, 1] = sin * w / h, cos
    grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def random_rotation(x: torch.Tensor, rng: np.random.Generator, max_degrees: float, p: float = 1.0) -> torch.Tensor:
    """Small in-plane rotation, angle uniform in ``[-max_degrees, max_degrees]``.

    Suits X-ray, fundus, pathology and axial CT/MRI, where patient or slide placement varies by a few degrees.
    """
    if _skip(rng, p) or max_degrees <= 0:
        return x
    return rotate(x, float(rng.uniform(-max_degrees, max_degrees)))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with the same ``sigma`` (in pixels/voxels) along every spatial axis; reflect padding."""
    if sigma <= 0:
        return x
    radius = int(math.ceil(3.0 * sigma))
    for axis in range(1, x.ndim):
        length = x.shape[axis]
        r = min(radius, length - 1)  # reflect padding needs the pad to be shorter than the axis
        if r < 1:
            continue
        t = torch.arange(-r, r + 1, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (t / sigma) ** 2)
        kernel = (kernel / kernel.sum()).view(1, 1, -1)
        y = x.movedim(axis, -1)
        shape = y.shape
        y = F.pad(y.reshape(-1, 1, length), (r, r), mode="reflect")
        x = F.conv1d(y, kernel).reshape(shape).movedim(-1, axis)
    return x.contiguous()


def random_gaussian_blur(
    x: torch.Tensor, rng: np.random.Generator, sigma_range: tuple[float, float], p: float = 1.0
) -> torch.Tensor:
    """Blur with sigma uniform in ``sigma_range``: invariance to resolution and reconstruction kernel; any modality."""
    if _skip(rng, p):
        return x
    return gaussian_blur(x, float(rng.uniform(*sigma_range)))


def random_gaussian_noise(
    x: torch.Tensor, rng: np.random.Generator, std_range: tuple[float, float], p: float = 1.0
) -> torch.Tensor:
    """Additive Gaussian noise, std uniform in ``std_range`` (in the units of ``x``): low-dose CT, MRI, ultrasound, X-ray."""
    if _skip(rng, p):
        return x
    std = float(rng.uniform(*std_range))
    noise = rng.standard_normal(size=tuple(x.shape), dtype=np.float32) * np.float32(std)
    return x + torch.from_numpy(noise).to(x.dtype)


def random_intensity_scale_shift(
    x: torch.Tensor,
    rng: np.random.Generator,
    scale_range: tuple[float, float],
    shift_range: tuple[float, float],
    p: float = 1.0,
) -> torch.Tensor:
    """``x * a + b``: contrast and brightness for grayscale data already z-scored (the colour jitter of X-ray/MRI)."""
    if _skip(rng, p):
        return x
    a = float(rng.uniform(*scale_range))
    b = float(rng.uniform(*shift_range))
    return x * a + b


def random_gamma(x: torch.Tensor, rng: np.random.Generator, gamma_range: tuple[float, float], p: float = 1.0) -> torch.Tensor:
    """Gamma on the image's min-max rescaled values, mapped back to its range; gamma log-uniform in ``gamma_range``.

    A nonlinear contrast change (exposure, display curves) for grayscale modalities; a constant image is unchanged.
    """
    if _skip(rng, p):
        return x
    gamma = math.exp(rng.uniform(math.log(gamma_range[0]), math.log(gamma_range[1])))
    lo, hi = x.min(), x.max()
    span = hi - lo
    if float(span) < 1e-12:
        return x
    return ((x - lo) / span).clamp(0.0, 1.0).pow(gamma) * span + lo


def random_ct_window(
    hu: np.ndarray | torch.Tensor,
    rng: np.random.Generator,
    windows: Sequence[tuple[float, float]],
    jitter: float = 0.0,
) -> torch.Tensor:
    """Pick one ``(center, width)`` CT window, clip raw HU to it and scale to [0, 1]; CT only, before any z-scoring.

    Jitter is relative to the window width: the center moves by up to ``jitter * width``
    and the width is scaled by a factor in ``[1 - jitter, 1 + jitter]``.
    Typical windows: lung (-600, 1500), mediastinum (40, 400), bone (400, 1800).
    """
    if len(windows) == 0:
        raise ValueError("random_ct_window needs at least one (center, width) window")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"CT window jitter must be in [0, 1), got {jitter}")
    center, width = (float(v) for v in windows[int(rng.integers(len(windows)))])
    if width <= 0:
        raise ValueError(f"CT window width must be positive, got window ({center}, {width})")
    center += width * jitter * float(rng.uniform(-1.0, 1.0))
    width *= 1.0 + jitter * float(rng.uniform(-1.0, 1.0))
    x = hu if isinstance(hu, torch.Tensor) else torch.from_numpy(np.asarray(hu, dtype=np.float32).copy())
    x = x.to(torch.float32)
    lo = center - width / 2.0
    return ((x - lo) / width).clamp(0.0, 1.0)


_GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def random_color_jitter(
    x: torch.Tensor,
    rng: np.random.Generator,
    brightness: float,
    contrast: float,
    saturation: float,
    p: float = 1.0,
) -> torch.Tensor:
    """Brightness, contrast and saturation factors in ``[1 - s, 1 + s]``, applied in random order.

    Only for RGB data in about [0, 1] (fundus photographs, H&E pathology: stain and camera variation);
    no colour jitter on grayscale, where :func:`random_intensity_scale_shift` and :func:`random_gamma` do that job.
    Values are not clamped.
    """
    if x.shape[0] != 3:
        raise ValueError(f"colour jitter needs a 3-channel RGB tensor, got shape {tuple(x.shape)}")
    if _skip(rng, p):
        return x
    factors = [float(rng.uniform(max(0.0, 1.0 - s), 1.0 + s)) for s in (brightness, contrast, saturation)]
    w = torch.tensor(_GRAY_WEIGHTS, dtype=x.dtype).view(3, *[1] * (x.ndim - 1))
    for op in rng.permutation(3):
        f = factors[op]
        if op == 0:
            x = x * f
        elif op == 1:
            mean = (x * w).sum(dim=0).mean()
            x = (x - mean) * f + mean
        else:
            gray = (x * w).sum(dim=0, keepdim=True)
            x = (x - gray) * f + gray
    return x
