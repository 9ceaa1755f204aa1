"""One orientation for every stored volume, whatever file it came from.

DICOM series arrive in their acquisition order (an axial CT is typically
``SPL``: slices towards superior, rows towards posterior, columns towards
the patient's left; sagittal and coronal series differ again) and NIfTI
files in whatever their affine says. Mixed in one shard set, the same
anatomy would sit on different array axes. Every volume is therefore stored
in RAS canonical orientation, as ``nibabel.as_closest_canonical`` defines it,
in our channels-first ``(C, D, H, W)`` order:

    D -> Superior, H -> Anterior, W -> Right        (orientation code "SAR")

Axes are only permuted and flipped (never resampled), choosing for each
patient axis the array axis closest to it, so oblique acquisitions keep
their voxels. Each sample records ``orientation`` (``"SAR"``) and
``original_orientation``: the code its array had before, in the same
letters (the direction each axis points towards).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

CANONICAL = "SAR"  # what D, H, W point towards in every stored volume


def ras_code(directions_ras: np.ndarray) -> str:
    """Letters each axis (a row of ``directions_ras``, RAS world coordinates) points towards, e.g. ``"SAR"``."""
    letters = []
    for v in np.asarray(directions_ras, float):
        i = int(np.argmax(np.abs(v)))
        letters.append("RAS"[i] if v[i] > 0 else "LPI"[i])
    return "".join(letters)


def to_canonical(volume: np.ndarray, directions_ras: np.ndarray,
                 spacing: Sequence[float] | None) -> tuple[np.ndarray, list[float] | None, str]:
    """``volume`` (C, D, H, W) whose axes D, H, W point along the rows of ``directions_ras`` (3x3, RAS), as
    ``(volume in CANONICAL orientation, spacing permuted with its axes, the original orientation code)``."""
    from nibabel.orientations import io_orientation

    directions = np.asarray(directions_ras, float)
    original = ras_code(directions)
    # io_orientation takes voxel -> world columns; it assigns each array axis its closest world axis
    # greedily (largest cosine first), so oblique axes still make a permutation.
    ornt = io_orientation(np.vstack([np.hstack([directions.T, np.zeros((3, 1))]), [0, 0, 0, 1]]))
    source_of = {int(world): axis for axis, (world, _) in enumerate(ornt)}
    order = [source_of[w] for w in (2, 1, 0)]  # D <- S/I, H <- A/P, W <- R/L
    out = np.transpose(volume, (0, *(1 + a for a in order)))
    flips = tuple(1 + p for p, a in enumerate(order) if ornt[a][1] < 0)
    if flips:
        out = np.flip(out, flips)
    new_spacing = None if spacing is None else [float(spacing[a]) for a in order]
    return np.ascontiguousarray(out), new_spacing, original


def lps_to_ras(directions_lps: np.ndarray) -> np.ndarray:
    """DICOM's patient coordinates (x towards Left, y towards Posterior, z towards Superior) to RAS."""
    return np.asarray(directions_lps, float) * np.array([-1.0, -1.0, 1.0])
