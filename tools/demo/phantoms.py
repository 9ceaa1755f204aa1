"""Synthetic chest phantoms whose class is where a diffuse opacity lies in the lungs, for the embedded demo (data v3).

Every image is a body with two lungs, ribs, a heart, a smooth bias field,
noise, a random gain and offset and partial-volume edges (rendered at twice
the resolution and averaged down), stored as a 12-bit value in uint16 (2D, like
a radiograph) or as int16 "Hounsfield units" (3D, like CT). Both lungs carry a
smooth, hazy opacity; the class is its distribution, as radiologists sort
diffuse lung disease by zone predominance:

    0 upper        denser towards the apices       (2D: the top of the lung; 3D: low indices of axis 0)
    1 lower        denser towards the bases
    2 peripheral   denser along the lateral lung wall (subpleural)
    3 central      denser towards the hila, sparing the periphery (perihilar)

In each lung's own frame (u: cranio-caudal position over the lung's radius, lat: lateral position over
the lung's lateral radius, positive towards the body wall) the opacity's weight is a soft step,
s(z) = 1 / (1 + exp(-z / 0.12)), of -u - 0.25, u - 0.25, lat - 0.25 or -lat - 0.25 for the four classes;
its strength is drawn per lung (log-uniform over a factor of two). Axis 0 is cranio-caudal in 2D (rows of a
frontal radiograph) and in 3D (the through-plane axis of axial CT), so in 3D upper and lower differ only
along the through-plane direction: one axial slice cannot tell them apart.

Everything that moves pixels varies independently of the class and widely: the body's position (a
third of the field of view), in-plane rotation (about 30 degrees) and size (0.6 to 1), lung size and
position, rib spacing and phase, the opacity's strength, gain, bias field and noise. The four weights
integrate to the same total over a lung, so neither the histogram nor any fixed pixel tells the class:
raw pixels score near chance (30-36% kNN or linear probe in 2D, 21-31% in 3D, with 4 classes), and an
encoder separates the classes only as far as it has learned where the lungs and their zones are.

Which augmentations agree with the classes: left-right flips (the last axis) and, in 3D, flips of the
anterior-posterior axis keep every class; a flip of axis 0 swaps upper and lower, so no config flips it.
Moderate zoom and small rotations keep the classes; rotations past ninety degrees mix them.

With every image comes a label map of the same grid (``LABEL_MAP``): background, body, lung, heart, and
"finding" where the opacity's weight exceeds one half (the predominant zone), for dense probes.

What a report can say about an image: pass ``facts={}`` to ``phantom`` / ``radiograph`` / ``ct_volume``
and it is filled with what was drawn (the class, the opacity's strength and grade per lung, which side is
worse if either, the lungs' geometry, heart and body size; ``FACT_KEYS``). Filling it draws nothing from
the random stream: the image and label map are the same bytes with or without it. ``draw_facts`` draws
the summary facts from the same distributions without rendering anything (for text corpora that need no
images).

Left and right follow the radiological convention: an image is viewed as if facing the patient (a PA
radiograph; an axial CT slice seen from the feet), so the patient's right lung lies on the image's
left. The image's left-right axis is its last axis: the lung at low indices along it (columns, in
2D) is the patient's *right* lung, the one at high indices the *left* lung.
"""
from __future__ import annotations

import math

import numpy as np

CLASSES_2D = ["upper", "lower", "peripheral", "central"]
CLASSES_3D = CLASSES_2D  # the same zones; in 3D upper and lower lie along the through-plane axis
LABEL_MAP = ["background", "body", "lung", "heart", "finding"]
# The lungs in the order the generator draws them: the first lies at low indices of the last axis,
# which is the patient's right in the radiological convention (see the module docstring).
SIDES = ("right", "left")
# Pose of the body: centre offset (per axis, in [-1, 1] units), in-plane angle (radians), smallest size.
# Wide on purpose: fixed pixels must not tell the zones.
BODY_SHIFT, BODY_ANGLE, MIN_SIZE = 0.3, 0.5, 0.6
# The opacity: strength per lung (log-uniform, in the image's [0, 1] scale, where air is ~0.18 and soft
# tissue ~0.53), the soft step's offset and width (in units of the lung's radius).
OPACITY = (0.06, 0.12)
ZONE_OFFSET, ZONE_WIDTH = 0.25, 0.12
MILD_BELOW = math.sqrt(OPACITY[0] * OPACITY[1])  # grade: "mild" below the geometric middle, else "moderate"
ASYMMETRIC_RATIO = 1.3  # one lung's strength this many times the other's: that side is named as worse
# Keys of a filled ``facts`` dict; ``draw_facts`` gives the summary ones (all but "lungs").
FACT_KEYS = ("dims", "label", "class", "strength", "grade", "worse_side", "heart_ratio", "body_width",
             "patient_size", "lungs")


def _coords(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Per-axis coordinates in [-1, 1] (pixel centres), full arrays."""
    axes = [(np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0 for n in shape]
    return np.meshgrid(*axes, indexing="ij")


def _rotate_inplane(d: list[np.ndarray], angle: float) -> list[np.ndarray]:
    """Rotate offsets ``d`` by ``angle`` in the last two axes (the image / axial plane)."""
    c, s = math.cos(angle), math.sin(angle)
    d = list(d)
    d[-2], d[-1] = c * d[-2] + s * d[-1], -s * d[-2] + c * d[-1]
    return d


def _ellipsoid(coords, centre, radii, angle: float = 0.0) -> np.ndarray:
    d = _rotate_inplane([c - m for c, m in zip(coords, centre)], angle)
    return sum((di / r) ** 2 for di, r in zip(d, radii)) <= 1.0


def zone_weight(label: int, u: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """The opacity's weight (0..1) of class ``label`` at lung-frame position ``u`` (cranio-caudal, over the
    lung's radius; negative is cranial) and ``lat`` (over the lateral radius; positive towards the body wall)."""
    z = [-u, u, lat, -lat][label] - ZONE_OFFSET
    return 1.0 / (1.0 + np.exp(-z / ZONE_WIDTH))


def _bias_field(coords, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A low-order polynomial gain field (scanner / exposure inhomogeneity)."""
    field = np.zeros_like(coords[0])
    for c in coords:
        field += rng.uniform(-1, 1) * c + rng.uniform(-0.5, 0.5) * c * c
    return 1.0 + strength * field


def _downsample(x: np.ndarray, f: int) -> np.ndarray:
    """Average ``f``^n blocks: partial-volume edges."""
    shape = []
    for n in x.shape:
        shape += [n // f, f]
    return x.reshape(shape).mean(axis=tuple(range(1, 2 * x.ndim, 2)))


def _strength(rng: np.random.Generator) -> float:
    return float(math.exp(rng.uniform(math.log(OPACITY[0]), math.log(OPACITY[1]))))


def phantom(label: int, shape: tuple[int, ...], rng: np.random.Generator,
            facts: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(float32 image roughly in [0, 1], uint8 label map) of ``shape`` (2D or 3D) with zone class ``label``.

    ``facts``, when given, is filled with what the image shows (``FACT_KEYS``; see ``_facts``) without
    drawing from ``rng``: the image is the same with or without it."""
    if label not in range(4):
        raise ValueError(f"label must be in 0..3, got {label}")
    n = len(shape)
    f = 2  # supersampling factor for partial volume
    coords = _coords(tuple(s * f for s in shape))
    size = rng.uniform(MIN_SIZE, 1.0)  # patient size
    body_centre = rng.uniform(-BODY_SHIFT, BODY_SHIFT, size=n)
    body_radii = size * np.array([0.95] * (n - 2) + [rng.uniform(0.8, 0.95), rng.uniform(0.72, 0.9)])
    body_angle = rng.uniform(-BODY_ANGLE, BODY_ANGLE)
    body = _ellipsoid(coords, body_centre, body_radii, body_angle)
    tissue = rng.uniform(0.5, 0.56)
    img = np.full(coords[0].shape, rng.uniform(0.0, 0.06), dtype=np.float32)
    img[body] = tissue
    labels = np.zeros(coords[0].shape, dtype=np.uint8)
    labels[body] = 1

    lungs, strengths, zone = [], [], np.zeros(coords[0].shape, dtype=bool)
    air = rng.uniform(0.16, 0.2)
    for side in (-1.0, 1.0):
        offset = np.zeros(n)
        offset[-1] = side * rng.uniform(0.4, 0.5) * body_radii[-1]
        offset[-2] = rng.uniform(-0.1, 0.05)
        offset = np.array(_rotate_inplane(list(offset), -body_angle))
        radii = body_radii * rng.uniform(0.8, 0.9)
        radii[-1] = body_radii[-1] * rng.uniform(0.34, 0.42)
        angle = body_angle + rng.uniform(-0.15, 0.15)
        lung = _ellipsoid(coords, body_centre + offset, radii, angle) & body
        # The finding: the zone's opacity, in the lung's own frame (axis 0 cranio-caudal, the last lateral).
        d = _rotate_inplane([c - m for c, m in zip(coords, body_centre + offset)], angle)
        weight = zone_weight(label, d[0] / radii[0], side * d[-1] / radii[-1])
        strength = _strength(rng)
        img[lung] = air + strength * weight[lung]
        labels[lung] = 2
        zone |= lung & (weight > 0.5)
        lungs.append((body_centre + offset, radii, angle))
        strengths.append(strength)
    labels[zone] = 4
    # Ribs: curved bright bands across the lungs (texture every class shares), random spacing and phase.
    d = _rotate_inplane([c - m for c, m in zip(coords, body_centre)], body_angle)
    period = rng.uniform(0.25, 0.29) * size
    arc = d[-2] + 0.35 * d[-1] ** 2
    ribs = (0.5 + 0.5 * np.cos(2 * math.pi * arc / period + rng.uniform(0, 2 * math.pi))) ** 6
    img += rng.uniform(0.03, 0.07) * ribs * (labels >= 2)
    heart_centre = body_centre + np.array(_rotate_inplane([0.0] * (n - 2) + [rng.uniform(0.05, 0.25), rng.uniform(-0.1, 0.1)], -body_angle))
    heart_radii = body_radii * np.array([0.4] * (n - 2) + [rng.uniform(0.25, 0.32), rng.uniform(0.25, 0.35)])
    heart = _ellipsoid(coords, heart_centre, heart_radii, body_angle) & body
    img[heart] = tissue + rng.uniform(0.05, 0.15)
    labels[heart] = 3
    if facts is not None:
        facts.update(_facts(label, n, lungs, strengths, heart_radii[-1] / body_radii[-1], body_radii[-1], size))

    img = _downsample(img, f)
    labels = _majority(labels, f, len(LABEL_MAP))
    small = _coords(shape)
    img *= _bias_field(small, rng, strength=rng.uniform(0.05, 0.25))
    img += rng.normal(0.0, rng.uniform(0.015, 0.02), size=shape).astype(np.float32)
    return (img * rng.uniform(0.8, 1.2) + rng.uniform(-0.05, 0.05)).astype(np.float32), labels


def _majority(labels: np.ndarray, f: int, k: int) -> np.ndarray:
    """Label map downsampled by ``f`` per axis: each cell takes its most frequent label, the finding winning ties
    upwards (any finding voxel in a cell marks the cell, so a thin zone keeps its mask)."""
    counts = np.stack([_downsample((labels == c).astype(np.float32), f) for c in range(k)])
    out = counts.argmax(axis=0).astype(np.uint8)
    out[counts[k - 1] > 0] = k - 1
    return out


def _summary(label: int, n: int, strengths: list[float], heart_ratio: float, body_width: float, size: float) -> dict:
    right, left = strengths
    worse = (SIDES[0] if right >= ASYMMETRIC_RATIO * left else SIDES[1] if left >= ASYMMETRIC_RATIO * right else None)
    return {"dims": n, "label": int(label), "class": (CLASSES_2D if n == 2 else CLASSES_3D)[label],
            "strength": {side: float(s) for side, s in zip(SIDES, strengths)},
            "grade": {side: "mild" if s < MILD_BELOW else "moderate" for side, s in zip(SIDES, strengths)},
            "worse_side": worse, "heart_ratio": float(heart_ratio), "body_width": float(body_width),
            "patient_size": float(size)}


def _facts(label, n, lungs, strengths, heart_ratio, body_half_width, size) -> dict:
    """The facts of one phantom. Summary: ``dims``, ``label``, ``class`` (its name, the predominant zone),
    ``strength`` (``{"right": a, "left": b}``: the opacity's strength per lung, 0.06 to 0.12 of the image's
    [0, 1] scale), ``grade`` (per lung, "mild" or "moderate"), ``worse_side`` ("right" or "left" where one
    lung's strength is at least 1.3 times the other's, else None), ``heart_ratio`` (heart width over body
    width, the cardiothoracic ratio: 0.25 to 0.35, always normal), ``body_width`` (body half-width over the
    field of view's) and ``patient_size`` (the overall scale, 0.6 to 1). Geometry, in the grid's [-1, 1]
    coordinates (pixel centres, spatial axes in stored order): ``lungs`` ({side: {"centre", "radii",
    "angle"}}: the lung's ellipse before it is clipped to the body, its radii along the axes turned by
    ``angle`` in the last two axes; the zone weights are taken in that frame)."""
    out = _summary(label, n, strengths, heart_ratio, body_half_width, size)
    out["lungs"] = {side: {"centre": [float(v) for v in c], "radii": [float(v) for v in r], "angle": float(a)}
                    for side, (c, r, a) in zip(SIDES, lungs)}
    return out


def draw_facts(label: int, dims: int, rng: np.random.Generator) -> dict:
    """Summary facts (``FACT_KEYS`` but "lungs") of a phantom of class ``label`` drawn from the generator's
    distributions, without rendering an image: for report corpora that need no pixels. They belong to no
    particular image (a different random stream from ``phantom``'s)."""
    if label not in range(4) or dims not in (2, 3):
        raise ValueError(f"label must be in 0..3 and dims 2 or 3, got {label}, {dims}")
    size = rng.uniform(MIN_SIZE, 1.0)
    body_half_width = size * rng.uniform(0.72, 0.9)
    strengths = [_strength(rng), _strength(rng)]
    return _summary(label, dims, strengths, rng.uniform(0.25, 0.35), body_half_width, size)


def radiograph(label: int, size: int, rng: np.random.Generator, facts: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A 2D phantom as a 12-bit radiograph in uint16, shape (1, size, size), and its label map; ``facts`` as in ``phantom``."""
    img, labels = phantom(label, (size, size), rng, facts)
    return np.clip(img * 4095.0, 0, 4095).astype(np.uint16)[None], labels[None]


def ct_volume(label: int, size: int, rng: np.random.Generator, facts: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A 3D phantom in Hounsfield-like int16, shape (1, size, size, size): air -1000, soft tissue ~0..+100; and its
    label map; ``facts`` as in ``phantom``."""
    vol, labels = phantom(label, (size, size, size), rng, facts)
    return np.clip(vol * 1500.0 - 1000.0, -1024, 3071).astype(np.int16)[None], labels[None]
