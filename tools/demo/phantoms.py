"""Synthetic chest phantoms whose class is the pattern of a diffuse lung disease, for the embedded demo (data v2).

Every image is a body with two lungs, ribs, a heart, a smooth bias field,
noise, a random gain and offset and partial-volume edges (rendered at twice
the resolution and averaged down), stored as a 12-bit value in uint16 (2D, like
a radiograph) or as int16 "Hounsfield units" (3D, like CT). Centred in the
lungs lie four to fourteen lesions of one kind; the kind is the class, as
radiologists name lung patterns by the shape of their elements:

2D (radiograph)                        3D (CT; axis 0 is cranio-caudal, the through-plane axis)
    0 nodular    solid dots                0 nodular  spheres
    1 cystic     rings                     1 vessel   short tubes along the body axis (through-plane)
    2 linear     short line segments       2 linear   short tubes lying in the axial plane
    3 reticular  crosses                   3 plate    flat discs lying in the axial plane

Everything that moves pixels varies independently of the class: the body's
position, rotation and size, lung size and position, rib spacing and phase,
where the lesions lie and how they are turned and sized, their number and
contrast, gain, bias field and noise. Each lesion's integrated intensity is
drawn from one range for every kind, so neither the histogram nor any pixel
position tells the class: raw pixels (kNN or a linear probe) score near
chance, and an encoder separates the kinds only as far as it has learned
what lesions look like (the random-init ViT's linear probe, about 42% in 2D,
is the other baseline to beat).

Which augmentations agree with the classes: every class is unchanged by flips
along any axis and by in-plane rotation, and by moderate zoom. In 3D the
classes are defined by orientation relative to the body axis, so no rotation
may mix axis 0 with the others, and one axial slice cannot tell them apart (a
vessel's slice is a nodule's slice): they need the through-plane direction.

With every image comes a label map of the same grid (``LABEL_MAP``), for dense probes.

What a report can say about an image: pass ``facts={}`` to ``phantom`` / ``radiograph`` /
``ct_volume`` and it is filled with what was drawn (the class, how many lesions were rendered and in
which lung, the lungs' and lesions' geometry, heart and body size; ``FACT_KEYS``). Filling it draws
nothing from the random stream: the image and label map are the same bytes with or without it.
``draw_facts`` draws the summary facts from the same distributions without rendering anything (for
text corpora that need no images).

Left and right follow the radiological convention: an image is viewed as if facing the patient (a PA
radiograph; an axial CT slice seen from the feet), so the patient's right lung lies on the image's
left. The image's left-right axis is its last axis: the lung at low indices along it (columns, in
2D) is the patient's *right* lung, the one at high indices the *left* lung.
"""
from __future__ import annotations

import math

import numpy as np

CLASSES_2D = ["nodular", "cystic", "linear", "reticular"]
CLASSES_3D = ["nodular", "vessel", "linear", "plate"]
LABEL_MAP = ["background", "body", "lung", "heart", "finding"]
# Lesions per image and their size (in [-1, 1] coordinates, times the patient's size), by spatial dims:
# large enough to span two to four patches of a patch-8 ViT at the demo's 64 px / 32^3.
LESION_COUNT = {2: (4, 8), 3: (8, 14)}
LESION_SIZE = {2: (0.2, 0.26), 3: (0.2, 0.28)}
# The lungs in the order the generator draws them: the first lies at low indices of the last axis,
# which is the patient's right in the radiological convention (see the module docstring).
SIDES = ("right", "left")
# Keys of a filled ``facts`` dict; ``draw_facts`` gives the summary ones (all but "lungs" and "lesions").
FACT_KEYS = ("dims", "label", "class", "count", "per_lung", "laterality", "heart_ratio", "body_width", "patient_size",
             "lungs", "lesions")


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


def _lesion(label: int, d: list[np.ndarray], r: float, rng: np.random.Generator) -> np.ndarray:
    """Occupancy of one lesion of kind ``label`` and size ``r``, from offsets ``d`` to its centre."""
    d = _rotate_inplane(d, rng.uniform(0, 2 * math.pi))
    if len(d) == 2:
        if label == 0:
            return d[0] ** 2 + d[1] ** 2 <= (0.6 * r) ** 2
        if label == 1:
            rho2 = d[0] ** 2 + d[1] ** 2
            return (rho2 <= r * r) & (rho2 >= (0.6 * r) ** 2)
        if label == 2:
            return (np.abs(d[0]) <= 1.6 * r) & (np.abs(d[1]) <= 0.22 * r)
        arm = 1.1 * r
        return ((np.abs(d[0]) <= arm) & (np.abs(d[1]) <= 0.2 * r)) | ((np.abs(d[1]) <= arm) & (np.abs(d[0]) <= 0.2 * r))
    tilt = rng.uniform(-0.15, 0.15, size=2)  # a few degrees off the ideal orientation
    if label == 0:
        return d[0] ** 2 + d[1] ** 2 + d[2] ** 2 <= (0.7 * r) ** 2
    if label == 1:  # along axis 0
        d1, d2 = d[1] - tilt[0] * d[0], d[2] - tilt[1] * d[0]
        return (d1 ** 2 + d2 ** 2 <= (0.35 * r) ** 2) & (np.abs(d[0]) <= 1.6 * r)
    if label == 2:  # along an in-plane direction
        d0 = d[0] - tilt[0] * d[2]
        return (d0 ** 2 + d[1] ** 2 <= (0.35 * r) ** 2) & (np.abs(d[2]) <= 1.6 * r)
    d0 = d[0] - tilt[0] * d[1] - tilt[1] * d[2]  # a disc normal to axis 0
    return (d[1] ** 2 + d[2] ** 2 <= r * r) & (np.abs(d0) <= 0.22 * r)


def _lesion_volume(label: int, r: float, n: int) -> float:
    """The nominal occupancy of a lesion (in coordinate units), to even out integrated intensity across kinds."""
    if n == 2:
        return [math.pi * 0.36, math.pi * 0.64, 4 * 1.6 * 0.22, 2 * 4 * 1.1 * 0.2 - 0.16][label] * r * r
    return [4 / 3 * math.pi * 0.343, 2 * 1.6 * math.pi * 0.1225, 2 * 1.6 * math.pi * 0.1225, 2 * 0.22 * math.pi][label] * r ** 3


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


def phantom(label: int, shape: tuple[int, ...], rng: np.random.Generator,
            facts: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(float32 image roughly in [0, 1], uint8 label map) of ``shape`` (2D or 3D) with finding class ``label``.

    ``facts``, when given, is filled with what the image shows (``FACT_KEYS``; see ``_facts``) without
    drawing from ``rng``: the image is the same with or without it."""
    if label not in range(4):
        raise ValueError(f"label must be in 0..3, got {label}")
    n = len(shape)
    f = 2  # supersampling factor for partial volume
    coords = _coords(tuple(s * f for s in shape))
    size = rng.uniform(0.88, 1.0)  # patient size
    body_centre = rng.uniform(-0.08, 0.08, size=n)
    body_radii = size * np.array([0.95] * (n - 2) + [rng.uniform(0.8, 0.95), rng.uniform(0.72, 0.9)])
    body_angle = rng.uniform(-0.15, 0.15)
    body = _ellipsoid(coords, body_centre, body_radii, body_angle)
    tissue = rng.uniform(0.5, 0.56)
    img = np.full(coords[0].shape, rng.uniform(0.0, 0.06), dtype=np.float32)
    img[body] = tissue
    labels = np.zeros(coords[0].shape, dtype=np.uint8)
    labels[body] = 1

    lungs = []
    air = rng.uniform(0.16, 0.2)
    for side in (-1.0, 1.0):
        offset = np.zeros(n)
        offset[-1] = side * rng.uniform(0.4, 0.5) * body_radii[-1]
        offset[-2] = rng.uniform(-0.1, 0.05)
        offset = np.array(_rotate_inplane(list(offset), -body_angle))
        radii = body_radii * rng.uniform(0.8, 0.9)
        radii[-1] = body_radii[-1] * rng.uniform(0.34, 0.42)
        lung = _ellipsoid(coords, body_centre + offset, radii, body_angle + rng.uniform(-0.15, 0.15)) & body
        img[lung] = air
        labels[lung] = 2
        lungs.append((body_centre + offset, radii))
    # Ribs: curved bright bands across the lungs (texture every class shares), random spacing and phase.
    d = _rotate_inplane([c - m for c, m in zip(coords, body_centre)], body_angle)
    period = rng.uniform(0.25, 0.29) * size
    arc = d[-2] + 0.35 * d[-1] ** 2
    ribs = (0.5 + 0.5 * np.cos(2 * math.pi * arc / period + rng.uniform(0, 2 * math.pi))) ** 6
    img += rng.uniform(0.03, 0.07) * ribs * (labels == 2)
    heart_centre = body_centre + np.array(_rotate_inplane([0.0] * (n - 2) + [rng.uniform(0.05, 0.25), rng.uniform(-0.1, 0.1)], -body_angle))
    heart_radii = body_radii * np.array([0.4] * (n - 2) + [rng.uniform(0.25, 0.32), rng.uniform(0.25, 0.35)])
    heart = _ellipsoid(coords, heart_centre, heart_radii, body_angle) & body
    img[heart] = tissue + rng.uniform(0.05, 0.15)
    labels[heart] = 3

    # The finding: lesions of the class's kind centred in the lungs, each placed, turned, sized and
    # contrasted on its own; rendered in a window around each lesion (a fraction of the grid).
    spacing = 2.0 / coords[0].shape[0]
    count = rng.integers(*LESION_COUNT[n])
    rendered = []  # (lung index, centre, size) of each lesion that left a mark
    for _ in range(count):
        which = int(rng.integers(2))
        centre, radii = lungs[which]
        r = rng.uniform(*LESION_SIZE[n]) * size
        for _ in range(100):
            pos = centre + rng.uniform(-1, 1, size=n) * radii
            if _ellipsoid([np.array(pos[i]) for i in range(n)], centre, radii * 0.9).item():
                break
        half = int(math.ceil(1.8 * r / spacing)) + 1
        index = [int(round((p + 1) / spacing - 0.5)) for p in pos]
        window = tuple(slice(max(i - half, 0), min(i + half + 1, coords[0].shape[k])) for k, i in enumerate(index))
        occupied = _lesion(label, [c[window] - p for c, p in zip(coords, pos)], r, rng) & body[window]
        if not occupied.any():
            continue
        contrast = rng.uniform(0.4, 0.5) * _lesion_volume(0, r, n) / _lesion_volume(label, r, n)  # same integral
        img[window][occupied] += contrast
        labels[window][occupied] = 4
        rendered.append((which, pos, r))
    if facts is not None:
        facts.update(_facts(label, n, lungs, rendered, body_angle, heart_radii[-1] / body_radii[-1], body_radii[-1], size))

    img = _downsample(img, f)
    labels = _majority(labels, f, len(LABEL_MAP))
    small = _coords(shape)
    img *= _bias_field(small, rng, strength=rng.uniform(0.05, 0.25))
    img += rng.normal(0.0, rng.uniform(0.015, 0.02), size=shape).astype(np.float32)
    return (img * rng.uniform(0.8, 1.2) + rng.uniform(-0.05, 0.05)).astype(np.float32), labels


def _majority(labels: np.ndarray, f: int, k: int) -> np.ndarray:
    """Label map downsampled by ``f`` per axis: each cell takes its most frequent label, the finding winning ties
    upwards (any finding voxel in a cell marks the cell, so small findings keep their mask)."""
    counts = np.stack([_downsample((labels == c).astype(np.float32), f) for c in range(k)])
    out = counts.argmax(axis=0).astype(np.uint8)
    out[counts[k - 1] > 0] = k - 1
    return out


def _summary(label: int, n: int, per_lung: list[int], heart_ratio: float, body_width: float, size: float) -> dict:
    count = sum(per_lung)
    laterality = "none" if count == 0 else "both" if min(per_lung) > 0 else SIDES[0] if per_lung[0] else SIDES[1]
    return {"dims": n, "label": int(label), "class": (CLASSES_2D if n == 2 else CLASSES_3D)[label], "count": count,
            "per_lung": dict(zip(SIDES, per_lung)), "laterality": laterality, "heart_ratio": float(heart_ratio),
            "body_width": float(body_width), "patient_size": float(size)}


def _facts(label, n, lungs, rendered, angle, heart_ratio, body_half_width, size) -> dict:
    """The facts of one phantom. Summary: ``dims``, ``label``, ``class`` (its name), ``count`` (lesions
    rendered: those that left at least one finding voxel), ``per_lung`` (``{"right": k, "left": m}``),
    ``laterality`` ("right", "left", "both"; "none" without lesions), ``heart_ratio`` (heart width over
    body width, the cardiothoracic ratio: 0.25 to 0.35, always normal), ``body_width`` (body width over
    the field of view's) and ``patient_size`` (the overall scale, 0.88 to 1). Geometry, in the grid's
    [-1, 1] coordinates (pixel centres, spatial axes in stored order): ``lungs`` ({side: {"centre",
    "radii", "angle"}}: the lung's ellipse before it is clipped to the body, its radii along the axes
    turned by ``angle`` in the last two axes) and ``lesions`` (one {"lung", "centre", "size"} per
    rendered lesion, in drawing order)."""
    per_lung = [sum(1 for which, _, _ in rendered if which == k) for k in range(2)]
    out = _summary(label, n, per_lung, heart_ratio, body_half_width, size)
    out["lungs"] = {side: {"centre": [float(v) for v in c], "radii": [float(v) for v in r], "angle": float(angle)}
                    for side, (c, r) in zip(SIDES, lungs)}
    out["lesions"] = [{"lung": SIDES[which], "centre": [float(v) for v in pos], "size": float(r)}
                      for which, pos, r in rendered]
    return out


def draw_facts(label: int, dims: int, rng: np.random.Generator) -> dict:
    """Summary facts (``FACT_KEYS`` but "lungs" and "lesions") of a phantom of class ``label`` drawn from the
    generator's distributions, without rendering an image: for report corpora that need no pixels. They
    belong to no particular image (a different random stream from ``phantom``'s); every drawn lesion
    counts as rendered, which the generator's almost always are."""
    if label not in range(4) or dims not in (2, 3):
        raise ValueError(f"label must be in 0..3 and dims 2 or 3, got {label}, {dims}")
    size = rng.uniform(0.88, 1.0)
    body_half_width = size * rng.uniform(0.72, 0.9)
    sides = rng.integers(2, size=int(rng.integers(*LESION_COUNT[dims])))
    per_lung = [int((sides == k).sum()) for k in range(2)]
    return _summary(label, dims, per_lung, rng.uniform(0.25, 0.35), body_half_width, size)


def radiograph(label: int, size: int, rng: np.random.Generator, facts: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A 2D phantom as a 12-bit radiograph in uint16, shape (1, size, size), and its label map; ``facts`` as in ``phantom``."""
    img, labels = phantom(label, (size, size), rng, facts)
    return np.clip(img * 4095.0, 0, 4095).astype(np.uint16)[None], labels[None]


def ct_volume(label: int, size: int, rng: np.random.Generator, facts: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A 3D phantom in Hounsfield-like int16, shape (1, size, size, size): air -1000, soft tissue ~0..+100; and its
    label map; ``facts`` as in ``phantom``."""
    vol, labels = phantom(label, (size, size, size), rng, facts)
    return np.clip(vol * 1500.0 - 1000.0, -1024, 3071).astype(np.int16)[None], labels[None]
