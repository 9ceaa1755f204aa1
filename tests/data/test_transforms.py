"""CPU transforms: crops stay inside the image and honour scale and ratio, intensity normalisation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pretrain.data.transforms import eval_view, match_channels, random_flip, random_resized_crop, to_tensor


@pytest.mark.parametrize("shape", [(1, 60, 80), (2, 20, 24, 28)])
def test_random_resized_crop_box_in_bounds_with_requested_scale_and_ratio(shape):
    x = torch.randn(shape)
    spatial = shape[1:]
    scale, ratio = (0.3, 0.9), (3 / 4, 4 / 3)
    fractions = []
    for seed in range(200):
        crop, box = random_resized_crop(x, [16] * len(spatial), np.random.default_rng(seed), scale=scale, ratio=ratio)
        assert crop.shape == (shape[0], *[16] * len(spatial))
        for (a, b), n in zip(box, spatial):
            assert 0 <= a < b <= n
        sides = [b - a for a, b in box]
        fractions.append(math.prod(sides) / math.prod(spatial))
        if len(spatial) == 2:  # aspect of the box relative to the image's within the ratio range (rounding aside)
            aspect = (sides[0] / spatial[0]) / (sides[1] / spatial[1])
            assert ratio[0] * 0.8 <= aspect <= ratio[1] * 1.25
    assert min(fractions) >= scale[0] * 0.7 and max(fractions) <= 1.0
    assert np.mean(fractions) == pytest.approx(np.mean(scale), abs=0.1)


def test_crop_content_comes_from_the_box():
    x = torch.arange(32 * 32, dtype=torch.float32).reshape(1, 32, 32)
    crop, box = random_resized_crop(x, (8, 8), np.random.default_rng(3), scale=(0.0625, 0.0625), ratio=(1, 1))
    (a0, b0), (a1, b1) = box
    assert (b0 - a0, b1 - a1) == (8, 8)
    torch.testing.assert_close(crop, x[:, a0:b0, a1:b1])  # same size: no resampling


def test_intensity_normalisation_modes():
    img = np.array([[[0, 1000], [2000, 4095]]], dtype=np.uint16)
    z = to_tensor(img, "zscore")
    assert float(z.mean()) == pytest.approx(0, abs=1e-6) and float(z.std()) == pytest.approx(1, abs=1e-5)
    r = to_tensor(img, "range")
    assert float(r.max()) == pytest.approx(4095 / 65535)  # integers scale by their dtype's range
    ct = np.array([[[-1024, 0], [1000, 3071]]], dtype=np.int16)
    assert float(to_tensor(ct, "range").min()) == pytest.approx((-1024 + 32768) / 65535)
    with pytest.raises(ValueError, match="unknown intensity"):
        to_tensor(img, "minmax")


def test_channel_matching_flip_and_eval_view():
    grey = torch.randn(1, 4, 4)
    assert torch.equal(match_channels(grey, 3)[2], grey[0])
    rgb = torch.randn(3, 4, 4)
    torch.testing.assert_close(match_channels(rgb, 1)[0], rgb.mean(0))
    x = torch.arange(16.0).reshape(1, 4, 4)
    flips = {tuple(random_flip(x, np.random.default_rng(s), [0, 1]).flatten().tolist()) for s in range(30)}
    assert len(flips) == 4  # none, vertical, horizontal, both
    view = eval_view(np.ones((1, 40, 40), np.uint8) * 7, (32, 32), 3, "none", key="k")
    assert view.shape == (3, 32, 32) and float(view.mean()) == pytest.approx(7)
    with pytest.raises(ValueError, match="'k'.*3D volume"):
        eval_view(np.ones((1, 40, 40), np.uint8), (8, 8, 8), 1, "none", key="k")
