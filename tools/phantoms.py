"""Synthetic phantom anatomy with lesion-like structures, for the embedded demo.

Every image is a body (an ellipse / ellipsoid) with organs, a smooth bias
field, one to three lesions, noise, and a random gain and offset, stored as a
12-bit value in uint16 (2D, like a radiograph) or as int16 "Hounsfield units"
(3D, like CT). The class is the *internal texture of the lesions*:

    0 stripes along the first in-plane axis     1 stripes along the second
    2 nodular (small spots)                     3 cross-hatch (two diagonals)

Every texture has zero mean and the same amplitude range, and lesion size,
count, position and mean intensity are drawn independently of the class, so
the class is not readable from global intensity, size or layout: a random-init
encoder, whose pooled features are close to a linear function of the layout,
scores near chance, and an encoder has to learn texture to separate classes.
All four textures are symmetric under flips, so flip augmentation keeps labels.
"""
from __future__ import annotations

import math

import numpy as np

CLASSES = ["stripes_a", "stripes_b", "nodular", "crosshatch"]


def _coords(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Per-axis coordinates in [-1, 1], broadcastable."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    return np.meshgrid(*axes, indexing="ij")


def _ellipsoid(coords: list[np.ndarray], centre, radii, rotation: float) -> np.ndarray:
    """Boolean mask of an ellipse/ellipsoid rotated by ``rotation`` in the last two axes."""
    d = [c - m for c, m in zip(coords, centre)]
    c, s = math.cos(rotation), math.sin(rotation)
    d[-2], d[-1] = c * d[-2] + s * d[-1], -s * d[-2] + c * d[-1]
    return sum((di / r) ** 2 for di, r in zip(d, radii)) <= 1.0


def _texture(label: int, coords_px: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Zero-mean texture in [-1, 1] of the given class, in pixel coordinates."""
    period = rng.uniform(3.0, 6.0)
    jitter = rng.uniform(-0.25, 0.25)  # ~±15 degrees of orientation nuisance
    u, v = coords_px[-2], coords_px[-1]
    if label in (0, 1):
        angle = jitter + (0.0 if label == 0 else math.pi / 2)
        phase = (u * math.cos(angle) + v * math.sin(angle)) * 2 * math.pi / period
        return np.cos(phase + rng.uniform(0, 2 * math.pi)).astype(np.float32)
    if label == 2:
        # Spots on a jittered lattice in every axis (in-plane and, for volumes, depth).
        spots = np.ones_like(u)
        for c in coords_px:
            spots = spots * np.cos(c * 2 * math.pi / period + rng.uniform(0, 2 * math.pi)) ** 8
        return (2.0 * spots / max(spots.max(), 1e-6) - 1.0).astype(np.float32) * 0.9
    angle_a, angle_b = math.pi / 4 + jitter, -math.pi / 4 + jitter
    a = np.cos((u * math.cos(angle_a) + v * math.sin(angle_a)) * 2 * math.pi / period + rng.uniform(0, 2 * math.pi))
    b = np.cos((u * math.cos(angle_b) + v * math.sin(angle_b)) * 2 * math.pi / period + rng.uniform(0, 2 * math.pi))
    return (0.5 * (a + b)).astype(np.float32)


def _smooth_field(coords: list[np.ndarray], rng: np.random.Generator, strength: float) -> np.ndarray:
    """A low-order polynomial bias field (scanner inhomogeneity)."""
    field = np.zeros_like(coords[0])
    for c in coords:
        field += rng.uniform(-1, 1) * c + rng.uniform(-0.5, 0.5) * c * c
    return 1.0 + strength * field


def phantom(label: int, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A float32 chest-like phantom of ``shape`` (2D or 3D), roughly in [0, 1].

    Body with two lungs, a mediastinum and 0-3 focal nodules; the class is the
    diffuse texture pattern inside the lungs (as in interstitial lung disease).
    """
    if label not in range(len(CLASSES)):
        raise ValueError(f"label must be in 0..{len(CLASSES) - 1}, got {label}")
    coords = _coords(shape)
    coords_px = [c * (n - 1) / 2 for c, n in zip(coords, shape)]
    n = len(shape)
    body_centre = rng.uniform(-0.1, 0.1, size=n)
    body_radii = rng.uniform(0.7, 0.95, size=n)
    body = _ellipsoid(coords, body_centre, body_radii, rng.uniform(-0.3, 0.3))
    img = np.full(shape, rng.uniform(0.0, 0.08), dtype=np.float32)
    img[body] = rng.uniform(0.45, 0.65)
    texture = _texture(label, coords_px, rng)
    amplitude = rng.uniform(0.07, 0.12)
    for side in (-1.0, 1.0):  # lungs: the class lives in their texture
        centre = body_centre.copy()
        centre[-1] += side * rng.uniform(0.3, 0.45) * body_radii[-1]
        centre[:-1] += rng.uniform(-0.1, 0.1, size=n - 1)
        radii = rng.uniform(0.3, 0.45, size=n) * body_radii
        radii[:-1] *= rng.uniform(1.2, 1.6)  # taller than wide
        lung = _ellipsoid(coords, centre, radii, rng.uniform(-0.3, 0.3)) & body
        img[lung] = rng.uniform(0.2, 0.32) + amplitude * texture[lung]
    mediastinum = _ellipsoid(coords, body_centre + rng.uniform(-0.1, 0.1, size=n), rng.uniform(0.15, 0.3, size=n), 0.0) & body
    img[mediastinum] += rng.uniform(0.05, 0.2)
    for _ in range(rng.integers(0, 4)):  # focal nodules: nuisance, in every class
        centre = body_centre + rng.uniform(-0.6, 0.6, size=n) * body_radii
        img[_ellipsoid(coords, centre, rng.uniform(0.04, 0.12, size=n), 0.0) & body] += rng.uniform(0.1, 0.3)
    img *= _smooth_field(coords, rng, strength=rng.uniform(0.05, 0.25))
    img += rng.normal(0.0, rng.uniform(0.01, 0.03), size=shape).astype(np.float32)
    return img * rng.uniform(0.8, 1.2) + rng.uniform(-0.05, 0.05)


def radiograph(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A 2D phantom as a 12-bit radiograph in uint16, shape (1, size, size)."""
    img = phantom(label, (size, size), rng)
    return np.clip(img * 4095.0, 0, 4095).astype(np.uint16)[None]


def ct_volume(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A 3D phantom in Hounsfield-like int16, shape (1, size, size, size): air -1000, soft tissue ~0..+100."""
    vol = phantom(label, (size, size, size), rng)
    return np.clip(vol * 1500.0 - 1000.0, -1024, 3071).astype(np.int16)[None]
