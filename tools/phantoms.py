"""Synthetic chest-like phantoms with lesion-like structures, for the embedded demo.

Every image is a body (an ellipse / ellipsoid) with two lungs, a mediastinum,
a smooth bias field, noise and a random gain and offset, stored as a 12-bit
value in uint16 (2D, like a radiograph) or as int16 "Hounsfield units" (3D,
like CT). The class is the *shape* of its one or two large lesions:

    0 solid   round nodules              1 cavitary  rings with a dark centre
    2 spiculated  star-shaped masses     3 linear    elongated band-like opacities

Lesion area, count, position and intensity are drawn from the same ranges for
every class, and the lungs, mediastinum, bias field and noise vary
independently, so global intensity, size and layout say nothing about the
class: a random-init encoder, whose pooled features are close to a linear
function of the layout, scores near chance, and an encoder has to learn
shapes to separate the classes. Every shape is symmetric under flips (up to
its random orientation), so flip augmentation keeps labels.
"""
from __future__ import annotations

import math

import numpy as np

CLASSES = ["solid", "cavitary", "spiculated", "linear"]


def _coords(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Per-axis coordinates in [-1, 1], broadcastable."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    return np.meshgrid(*axes, indexing="ij")


def _rotate(d: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Offsets rotated by a random angle in every plane of consecutive axes."""
    d = list(d)
    for i in range(len(d) - 1):
        a = rng.uniform(0, 2 * math.pi)
        c, s = math.cos(a), math.sin(a)
        d[i], d[i + 1] = c * d[i] + s * d[i + 1], -s * d[i] + c * d[i + 1]
    return d


def _ellipsoid(coords: list[np.ndarray], centre, radii, rotation: float) -> np.ndarray:
    """Boolean mask of an ellipse/ellipsoid rotated by ``rotation`` in the last two axes."""
    d = [c - m for c, m in zip(coords, centre)]
    c, s = math.cos(rotation), math.sin(rotation)
    d[-2], d[-1] = c * d[-2] + s * d[-1], -s * d[-2] + c * d[-1]
    return sum((di / r) ** 2 for di, r in zip(d, radii)) <= 1.0


def _lesion(label: int, coords: list[np.ndarray], centre: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Float mask in [0, 1] of one lesion of the class's shape, of area about pi * radius^2."""
    d = _rotate([c - m for c, m in zip(coords, centre)], rng)
    r = np.sqrt(sum(di * di for di in d))
    if label == 0:  # solid nodule
        return (r <= radius).astype(np.float32)
    if label == 1:  # cavity: a ring of the same area as the disc, with a darker centre
        outer = radius * 1.35
        inner = math.sqrt(outer * outer - radius * radius)
        return (r <= outer).astype(np.float32) - 0.8 * (r <= inner).astype(np.float32)
    if label == 2:  # spiculated: radius modulated by the angle in the last plane
        theta = np.arctan2(d[-1], d[-2])
        spikes = int(rng.integers(5, 9))
        bound = radius * 0.8 * (1.0 + 0.55 * np.cos(spikes * theta + rng.uniform(0, 2 * math.pi)))
        if len(d) == 3:
            bound = bound * (1.0 + 0.3 * np.cos(spikes * np.arctan2(d[0], d[-2])))
        return (r <= bound).astype(np.float32)
    # linear: a band four times longer than wide, same area as the disc
    long, short = radius * 2.0, radius * 0.5
    axes = [long] + [short] * (len(d) - 1)
    return (sum((di / a) ** 2 for di, a in zip(d, axes)) <= 1.0).astype(np.float32)


def _smooth_field(coords: list[np.ndarray], rng: np.random.Generator, strength: float) -> np.ndarray:
    """A low-order polynomial bias field (scanner inhomogeneity)."""
    field = np.zeros_like(coords[0])
    for c in coords:
        field += rng.uniform(-1, 1) * c + rng.uniform(-0.5, 0.5) * c * c
    return 1.0 + strength * field


def phantom(label: int, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A float32 chest-like phantom of ``shape`` (2D or 3D) with lesions of class ``label``, roughly in [0, 1]."""
    if label not in range(len(CLASSES)):
        raise ValueError(f"label must be in 0..{len(CLASSES) - 1}, got {label}")
    coords = _coords(shape)
    n = len(shape)
    body_centre = rng.uniform(-0.1, 0.1, size=n)
    body_radii = rng.uniform(0.75, 0.95, size=n)
    body = _ellipsoid(coords, body_centre, body_radii, rng.uniform(-0.3, 0.3))
    img = np.full(shape, rng.uniform(0.0, 0.08), dtype=np.float32)
    img[body] = rng.uniform(0.45, 0.65)
    for side in (-1.0, 1.0):  # lungs
        centre = body_centre.copy()
        centre[-1] += side * rng.uniform(0.3, 0.45) * body_radii[-1]
        centre[:-1] += rng.uniform(-0.1, 0.1, size=n - 1)
        radii = rng.uniform(0.3, 0.45, size=n) * body_radii
        radii[:-1] *= rng.uniform(1.2, 1.6)  # taller than wide
        img[_ellipsoid(coords, centre, radii, rng.uniform(-0.3, 0.3)) & body] = rng.uniform(0.15, 0.3)
    mediastinum = _ellipsoid(coords, body_centre + rng.uniform(-0.1, 0.1, size=n), rng.uniform(0.15, 0.3, size=n), 0.0) & body
    img[mediastinum] += rng.uniform(0.05, 0.2)
    for _ in range(rng.integers(1, 3)):  # lesions, several patches wide: the class lives in their shape
        centre = body_centre + rng.uniform(-0.4, 0.4, size=n) * body_radii
        mask = _lesion(label, coords, centre, rng.uniform(0.28, 0.4), rng) * body
        img += rng.uniform(0.2, 0.35) * mask
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
