"""Block-wise token masks (BEiT/iBOT) for 2D patch grids and 3D patch volumes.

Masking contiguous blocks rather than scattered tokens keeps the masked-token
prediction from being solved by interpolating visible neighbours; the exact
count keeps every masked sample of a ratio the same size for batching.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _grow_into_neighbours(mask: np.ndarray, missing: int, rng: np.random.Generator) -> None:
    """Add ``missing`` unmasked tokens, each face-adjacent to the mask when possible (in place)."""
    while missing > 0:
        near = np.zeros_like(mask)
        for axis in range(mask.ndim):
            lo = [slice(None)] * mask.ndim
            hi = [slice(None)] * mask.ndim
            lo[axis], hi[axis] = slice(0, -1), slice(1, None)
            near[tuple(lo)] |= mask[tuple(hi)]
            near[tuple(hi)] |= mask[tuple(lo)]
        candidates = np.flatnonzero(near & ~mask)
        if candidates.size == 0:  # empty mask: seed a random token
            candidates = np.flatnonzero(~mask)
            take = candidates[rng.integers(candidates.size)][None]
        else:
            take = rng.choice(candidates, size=min(missing, candidates.size), replace=False)
        mask.reshape(-1)[take] = True
        missing -= take.size


def block_mask(
    grid: Sequence[int],
    num_masked: int,
    rng: np.random.Generator,
    min_block: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    max_attempts: int = 10,
) -> np.ndarray:
    """Boolean mask of shape ``grid`` with exactly ``num_masked`` True tokens, in rectangles (2D) or boxes (3D).

    Blocks of ``min_block`` up to the still-missing number of tokens, with log-uniform
    aspect ratios between axes within ``aspect``, land at random positions; a block is
    kept if it adds at least one new token without overshooting. After ``max_attempts``
    rejected draws in a row, the remainder is filled with tokens next to the mask.
    """
    grid = tuple(int(g) for g in grid)
    if not grid or min(grid) < 1:
        raise ValueError(f"block_mask: grid must have positive entries, got {grid}")
    total = math.prod(grid)
    if not 0 <= num_masked <= total:
        raise ValueError(f"block_mask: num_masked={num_masked} is outside [0, {total}] for grid {grid}")
    if not 0 < aspect[0] <= aspect[1]:
        raise ValueError(f"block_mask: aspect must satisfy 0 < low <= high, got {aspect}")
    n = len(grid)
    mask = np.zeros(grid, dtype=bool)
    count, failures = 0, 0
    log_lo, log_hi = 0.5 * math.log(aspect[0]), 0.5 * math.log(aspect[1])
    while failures < max_attempts and num_masked - count >= max(min_block, 1):
        missing = num_masked - count
        size = rng.uniform(max(min_block, 1), missing)
        # Log-stretch per axis, centred so it changes the shape and not the volume; for 2D the
        # side ratio exp(s0 - s1) is log-uniform over ``aspect`` when aspect[0] * aspect[1] == 1.
        stretch = rng.uniform(log_lo, log_hi, size=n)
        stretch -= stretch.mean()
        sides = [min(max(int(round(size ** (1.0 / n) * math.exp(s))), 1), g) for s, g in zip(stretch, grid)]
        starts = [int(rng.integers(0, g - side + 1)) for side, g in zip(sides, grid)]
        box = tuple(slice(a, a + side) for a, side in zip(starts, sides))
        new = int(math.prod(sides) - mask[box].sum())
        if 0 < new <= missing:
            mask[box] = True
            count += new
            failures = 0
        else:
            failures += 1
    _grow_into_neighbours(mask, num_masked - count, rng)
    return mask


def sample_mask(
    grid: Sequence[int],
    rng: np.random.Generator,
    ratio_range: tuple[float, float] = (0.1, 0.5),
    probability: float = 0.5,
) -> np.ndarray:
    """iBOT mask for one sample, flattened row-major (the ViT's patch-token order): ``(prod(grid),)`` bool.

    With ``probability`` the sample is masked at a ratio uniform in ``ratio_range``
    (``round(ratio * N)`` tokens, at least 1), otherwise nothing is masked. DINOv2 masks
    half the images of a batch and spreads the ratios evenly over them; drawing per
    sample has the same expectation and keeps the mask a per-sample, resumable transform.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"sample_mask: probability must be in [0, 1], got {probability}")
    if not 0.0 <= ratio_range[0] <= ratio_range[1] <= 1.0:
        raise ValueError(f"sample_mask: ratio_range must satisfy 0 <= low <= high <= 1, got {ratio_range}")
    total = math.prod(int(g) for g in grid)
    if rng.random() >= probability:
        return np.zeros(total, dtype=bool)
    ratio = rng.uniform(*ratio_range)
    num = min(max(int(round(ratio * total)), 1), total)
    return block_mask(grid, num, rng).reshape(-1)
