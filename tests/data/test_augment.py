"""Medical-image augmentations: geometry is exact where it can be, statistics are as requested, RNG is the caller's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.data.augment import (
    gaussian_blur,
    random_color_jitter,
    random_ct_window,
    random_gamma,
    random_gaussian_blur,
    random_gaussian_noise,
    random_intensity_scale_shift,
    random_rotation,
    rotate,
)


def rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("shape", [(1, 16, 20), (2, 6, 16, 16)])
def test_rotation_by_zero_is_identity(shape):
    x = torch.randn(shape)
    torch.testing.assert_close(random_rotation(x, rng(), max_degrees=0.0), x)
    torch.testing.assert_close(rotate(x, 0.0), x)
    torch.testing.assert_close(rotate(x, 1e-9), x, atol=1e-5, rtol=0)


def test_rotation_by_90_matches_rot90_in_the_interior():
    x = torch.randn(2, 16, 16)
    torch.testing.assert_close(rotate(x, 90.0)[:, 1:-1, 1:-1], torch.rot90(x, 1, dims=(-2, -1))[:, 1:-1, 1:-1], atol=1e-4, rtol=0)


def test_rotation_is_a_true_rotation_on_non_square_images():
    # About the centre, the central square of a 16x32 image turns onto itself; a rotation in
    # normalised coordinates (no aspect correction) would shear it instead.
    x = torch.randn(1, 16, 32)
    expected = torch.rot90(x[:, :, 8:24], 1, dims=(-2, -1))
    torch.testing.assert_close(rotate(x, 90.0)[:, 1:-1, 9:23], expected[:, 1:-1, 1:-1], atol=1e-4, rtol=0)


def test_volume_rotation_turns_each_axial_slice_without_mixing_slices():
    x = torch.randn(1, 5, 12, 12)
    out = rotate(x, 90.0)
    torch.testing.assert_close(out[:, :, 1:-1, 1:-1], torch.rot90(x, 1, dims=(-2, -1))[:, :, 1:-1, 1:-1], atol=1e-4, rtol=0)


def test_random_rotation_uses_border_padding_and_the_given_rng():
    x = torch.ones(1, 32, 32)
    out = random_rotation(x, rng(1), max_degrees=30.0)
    torch.testing.assert_close(out, x)  # no black corners
    y = torch.randn(1, 32, 32)
    torch.testing.assert_close(random_rotation(y, rng(5), 20.0), random_rotation(y, rng(5), 20.0))
    assert not torch.equal(random_rotation(y, rng(5), 20.0), random_rotation(y, rng(6), 20.0))


@pytest.mark.parametrize("shape", [(1, 64, 64), (1, 20, 20, 20)])
def test_blur_keeps_mean_reduces_variance_and_leaves_constants(shape):
    x = torch.randn(shape) + 5.0
    out = random_gaussian_blur(x, rng(), sigma_range=(1.5, 1.5))
    assert out.shape == x.shape
    assert abs(out.mean().item() - x.mean().item()) < 0.01
    assert out.var().item() < 0.3 * x.var().item()
    const = torch.full(shape, 3.0)
    torch.testing.assert_close(gaussian_blur(const, 2.0), const)


def test_blur_handles_axes_shorter_than_its_kernel():
    x = torch.randn(1, 2, 30, 30)
    assert gaussian_blur(x, 3.0).shape == x.shape
    assert gaussian_blur(torch.randn(1, 1, 30), 3.0).shape == (1, 1, 30)


def test_noise_has_requested_std_and_leaves_torch_rng_alone():
    x = torch.zeros(1, 128, 128)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    out = random_gaussian_noise(x, rng(3), std_range=(0.3, 0.3))
    assert torch.equal(torch.get_rng_state(), state)
    assert out.std().item() == pytest.approx(0.3, rel=0.03)
    assert abs(out.mean().item()) < 0.01
    torch.testing.assert_close(random_gaussian_noise(x, rng(3), (0.3, 0.3)), out)
    assert not torch.equal(random_gaussian_noise(x, rng(4), (0.3, 0.3)), out)


def test_probability_zero_is_identity():
    x = torch.randn(1, 8, 8)
    assert random_rotation(x, rng(), 10.0, p=0.0) is x
    assert random_gaussian_blur(x, rng(), (1.0, 2.0), p=0.0) is x
    assert random_gaussian_noise(x, rng(), (0.1, 0.2), p=0.0) is x
    assert random_intensity_scale_shift(x, rng(), (0.5, 2.0), (-1.0, 1.0), p=0.0) is x
    assert random_gamma(x, rng(), (0.5, 2.0), p=0.0) is x


def test_intensity_scale_shift_is_affine():
    x = torch.randn(1, 6, 7, 8)
    torch.testing.assert_close(random_intensity_scale_shift(x, rng(), (2.0, 2.0), (1.0, 1.0)), x * 2 + 1)


def test_gamma_keeps_range_and_order():
    x = torch.linspace(-3.0, 5.0, 100).reshape(1, 10, 10)
    out = random_gamma(x, rng(), (2.0, 2.0))
    assert out.min().item() == pytest.approx(-3.0) and out.max().item() == pytest.approx(5.0)
    assert torch.all(out.flatten().diff() >= 0)
    assert torch.all(out <= x + 1e-6) and not torch.allclose(out, x)  # gamma > 1 darkens mid-tones
    const = torch.full((1, 4, 4), 2.0)
    torch.testing.assert_close(random_gamma(const, rng(), (0.5, 2.0)), const)


def test_ct_window_clips_to_unit_range_monotonically():
    hu = np.linspace(-2000, 3000, 501, dtype=np.float32).reshape(1, 501)
    windows = [(-600, 1500), (40, 400), (400, 1800)]
    for seed in range(20):
        out = random_ct_window(hu, rng(seed), windows, jitter=0.1)
        assert out.dtype == torch.float32 and out.shape == (1, 501)
        assert out.min().item() == 0.0 and out.max().item() == 1.0
        assert torch.all(out.flatten().diff() >= 0)
    out = random_ct_window(torch.tensor([[-200.0, -160.0, 40.0, 240.0, 500.0]]), rng(), [(40, 400)], jitter=0.0)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="at least one"):
        random_ct_window(hu, rng(), [])


def test_color_jitter_refuses_grayscale_and_changes_rgb():
    with pytest.raises(ValueError, match=r"\(1, 8, 8\)"):
        random_color_jitter(torch.rand(1, 8, 8), rng(), 0.4, 0.4, 0.2)
    x = torch.rand(3, 16, 16)
    out = random_color_jitter(x, rng(2), 0.4, 0.4, 0.2)
    assert out.shape == x.shape and not torch.allclose(out, x)
    torch.testing.assert_close(random_color_jitter(x, rng(2), 0.4, 0.4, 0.2), out)
    gray = torch.rand(1, 16, 16).expand(3, 16, 16)
    torch.testing.assert_close(random_color_jitter(gray, rng(), 0.0, 0.0, 0.5), gray)  # saturation keeps gray gray
