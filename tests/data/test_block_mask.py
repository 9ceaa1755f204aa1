"""Block masks: exact token counts on 2D and 3D grids, contiguous blocks, iBOT's per-sample ratio and probability."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pretrain.data.block_mask import block_mask, sample_mask

GRIDS = [(8, 8), (14, 14), (4, 4, 4), (6, 6, 6)]


def neighbour_fraction(mask: np.ndarray) -> float:
    """Fraction of masked tokens with a masked face neighbour (4 in 2D, 6 in 3D)."""
    padded = np.pad(mask, 1)
    near = np.zeros_like(padded)
    for axis in range(mask.ndim):
        near |= np.roll(padded, 1, axis) | np.roll(padded, -1, axis)
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    return float((near[core] & mask).sum() / mask.sum())


@pytest.mark.parametrize("grid", GRIDS)
def test_exact_count_for_many_seeds(grid):
    total = math.prod(grid)
    targets = sorted({0, 1, 3, 4, total // 10, total // 3, total // 2, total - 1, total})
    for seed in range(40):
        for num in targets:
            mask = block_mask(grid, num, np.random.default_rng(seed))
            assert mask.shape == grid and mask.dtype == bool
            assert int(mask.sum()) == num, (grid, seed, num)


def test_exact_count_when_blocks_rarely_fit():
    # A single attempt and big minimum blocks leave most of the target to the top-up.
    for seed in range(20):
        mask = block_mask((14, 14), 77, np.random.default_rng(seed), min_block=30, max_attempts=1)
        assert int(mask.sum()) == 77


@pytest.mark.parametrize("grid,num", [((8, 8), 16), ((14, 14), 60), ((6, 6, 6), 50)])
def test_masked_tokens_form_blocks(grid, num):
    fractions = [neighbour_fraction(block_mask(grid, num, np.random.default_rng(s))) for s in range(50)]
    assert min(fractions) > 0.8
    # Scattered tokens at this density would mostly be isolated; blocks almost never are.
    assert np.mean(fractions) > 0.95
    scattered = np.zeros(math.prod(grid), dtype=bool)
    scattered[np.random.default_rng(0).choice(scattered.size, num, replace=False)] = True
    assert neighbour_fraction(scattered.reshape(grid)) < np.mean(fractions)


def test_blocks_are_not_all_one_shape():
    shapes = set()
    for s in range(30):
        rows, cols = np.nonzero(block_mask((14, 14), 12, np.random.default_rng(s)))
        shapes.add((rows.max() - rows.min(), cols.max() - cols.min()))
    assert len(shapes) > 3


def test_same_seed_same_mask():
    a = block_mask((6, 6, 6), 40, np.random.default_rng(3))
    assert np.array_equal(a, block_mask((6, 6, 6), 40, np.random.default_rng(3)))
    assert not np.array_equal(a, block_mask((6, 6, 6), 40, np.random.default_rng(4)))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="num_masked"):
        block_mask((4, 4), 17, np.random.default_rng())
    with pytest.raises(ValueError, match="grid"):
        block_mask((4, 0), 1, np.random.default_rng())
    with pytest.raises(ValueError, match="probability"):
        sample_mask((4, 4), np.random.default_rng(), probability=1.5)


def test_sample_mask_ratio_within_range():
    grid, lo, hi = (14, 14), 0.1, 0.5
    total = math.prod(grid)
    counts = []
    for s in range(200):
        mask = sample_mask(grid, np.random.default_rng(s), ratio_range=(lo, hi), probability=1.0)
        assert mask.shape == (total,) and mask.dtype == bool
        counts.append(int(mask.sum()))
    assert min(counts) >= round(lo * total) and max(counts) <= round(hi * total)
    assert np.mean(counts) / total == pytest.approx((lo + hi) / 2, abs=0.05)
    assert sample_mask(grid, np.random.default_rng(0), ratio_range=(1e-4, 1e-4), probability=1.0).sum() == 1


def test_sample_mask_is_the_block_mask_flattened_row_major():
    # Replays sample_mask's draws (coin, ratio) to rebuild its block mask on a non-square grid.
    grid = (4, 6, 5)
    for s in range(10):
        flat = sample_mask(grid, np.random.default_rng(s), ratio_range=(0.3, 0.3), probability=1.0)
        rng = np.random.default_rng(s)
        rng.random(), rng.uniform(0.3, 0.3)
        expected = block_mask(grid, round(0.3 * 120), rng)
        assert np.array_equal(flat.reshape(grid), expected)


def test_sample_mask_probability():
    n = 400
    masked = sum(sample_mask((8, 8), np.random.default_rng(s), probability=0.5).any() for s in range(n))
    assert abs(masked - n / 2) < 4 * math.sqrt(n * 0.25)
    assert not any(sample_mask((8, 8), np.random.default_rng(s), probability=0.0).any() for s in range(50))
