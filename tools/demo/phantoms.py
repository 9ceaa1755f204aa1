"""Synthetic chest-like phantoms whose class is the pattern of lung opacification, for the embedded demo.

Every image is a body (an ellipse / ellipsoid) with two lungs, a mediastinum,
nodules, a smooth bias field, noise and a random gain and offset, stored as a
12-bit value in uint16 (2D, like a radiograph) or as int16 "Hounsfield units"
(3D, like CT). The class is where the lungs are opacified (filled with
soft-tissue density, as in consolidation, collapse or effusion), with a
ragged, class-specific boundary:

    0 left lung opacified       1 right lung opacified
    2 both upper zones          3 both lower zones (effusion-like meniscus)

Every class opacifies about half of the lung volume with the same density, and
the body, lungs, nodules, bias field and noise vary independently, so the
intensity histogram and the size of structures say nothing about the class:
only the shape and place of the opacity do. A random-init encoder, whose
pooled features are close to a position-blind average of patch contents,
scores near chance; an encoder that has learned the layout of the anatomy
separates the classes. Left and right are classes here, so laterality must be
kept: train without left-right flips, as one should on chest images.
"""
from __future__ import annotations

import math

import numpy as np

CLASSES = ["left_lung", "right_lung", "upper_zones", "lower_zones"]


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


def _smooth_field(coords: list[np.ndarray], rng: np.random.Generator, strength: float) -> np.ndarray:
    """A low-order polynomial bias field (scanner inhomogeneity)."""
    field = np.zeros_like(coords[0])
    for c in coords:
        field += rng.uniform(-1, 1) * c + rng.uniform(-0.5, 0.5) * c * c
    return 1.0 + strength * field


def phantom(label: int, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A float32 chest-like phantom of ``shape`` (2D or 3D) with opacification pattern ``label``, roughly in [0, 1]."""
    if label not in range(len(CLASSES)):
        raise ValueError(f"label must be in 0..{len(CLASSES) - 1}, got {label}")
    coords = _coords(shape)
    n = len(shape)
    vertical, lateral = coords[-2], coords[-1]
    body_centre = rng.uniform(-0.1, 0.1, size=n)
    body_radii = rng.uniform(0.75, 0.95, size=n)
    body = _ellipsoid(coords, body_centre, body_radii, rng.uniform(-0.3, 0.3))
    tissue = rng.uniform(0.45, 0.65)
    img = np.full(shape, rng.uniform(0.0, 0.08), dtype=np.float32)
    img[body] = tissue
    air = rng.uniform(0.15, 0.3)
    # A ragged boundary: the opacity's edge wanders by a low-frequency wave.
    wave = 0.12 * np.sin(rng.uniform(2, 5) * (vertical + lateral) + rng.uniform(0, 2 * math.pi))
    for side in (-1.0, 1.0):  # lungs, side -1 = image left
        centre = body_centre.copy()
        centre[-1] += side * rng.uniform(0.3, 0.45) * body_radii[-1]
        centre[:-1] += rng.uniform(-0.1, 0.1, size=n - 1)
        radii = rng.uniform(0.3, 0.45, size=n) * body_radii
        radii[:-1] *= rng.uniform(1.2, 1.6)  # taller than wide
        lung = _ellipsoid(coords, centre, radii, rng.uniform(-0.2, 0.2)) & body
        img[lung] = air
        split = vertical - centre[-2] + wave  # < 0: upper part of this lung
        if label == 0 and side < 0 or label == 1 and side > 0:
            dense = lung
        elif label == 2:
            dense = lung & (split < 0)
        elif label == 3:
            meniscus = 0.35 * ((lateral - centre[-1]) / radii[-1]) ** 2  # rises towards the chest wall
            dense = lung & (split + meniscus > 0)
        else:
            dense = np.zeros_like(lung)
        img[dense] = tissue * rng.uniform(0.85, 1.0)
    mediastinum = _ellipsoid(coords, body_centre + rng.uniform(-0.1, 0.1, size=n), rng.uniform(0.15, 0.3, size=n), 0.0) & body
    img[mediastinum] += rng.uniform(0.05, 0.2)
    for _ in range(rng.integers(0, 4)):  # nodules anywhere: nuisance in every class
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
