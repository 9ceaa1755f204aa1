"""Multi-crop views: shapes for 2D/3D and channel counts, reproducibility, crop-major collation, validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.data.multicrop import MultiCropSpec, collate_crops, multi_crop

OFF = dict(blur_p=(0.0, 0.0, 0.0), noise_p=0.0, intensity_p=0.0, gamma_p=0.0)


def image2d(seed=0, channels=1):
    return np.random.default_rng(seed).integers(0, 4096, size=(channels, 64, 64), dtype=np.uint16)


def spec2d(**kw):
    return MultiCropSpec(**{"global_size": (48, 48), "local_size": (24, 24), "n_local": 4, **kw})


@pytest.mark.parametrize("in_ch,channels", [(1, 1), (1, 3), (3, 3)])
def test_2d_shapes_and_channels(in_ch, channels):
    out = multi_crop(image2d(channels=in_ch), spec2d(rotation_degrees=10.0), np.random.default_rng(0), channels, "zscore", "img")
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 4
    for g in out["global_crops"]:
        assert g.shape == (channels, 48, 48) and g.dtype == torch.float32 and torch.isfinite(g).all()
    for crop in out["local_crops"]:
        assert crop.shape == (channels, 24, 24)


def test_3d_shapes():
    vol = np.random.default_rng(0).normal(size=(1, 32, 32, 32)).astype(np.float32)
    spec = MultiCropSpec(global_size=(24, 24, 24), local_size=(12, 12, 12), n_local=3, rotation_degrees=10.0, flip_axes=[0, -1])
    out = multi_crop(vol, spec, np.random.default_rng(1), 1, "zscore", "vol")
    assert [tuple(g.shape) for g in out["global_crops"]] == [(1, 24, 24, 24)] * 2
    assert [tuple(c.shape) for c in out["local_crops"]] == [(1, 12, 12, 12)] * 3


def test_same_seed_same_crops_different_seed_different():
    img, spec = image2d(), spec2d()
    a = multi_crop(img, spec, np.random.default_rng(7), 1)
    b = multi_crop(img, spec, np.random.default_rng(7), 1)
    c = multi_crop(img, spec, np.random.default_rng(8), 1)
    for name in ("global_crops", "local_crops"):
        for x, y in zip(a[name], b[name]):
            assert torch.equal(x, y)
    assert not any(torch.allclose(x, y) for x, y in zip(a["global_crops"], c["global_crops"]))


def test_flip_axes_are_spatial_never_channels():
    img = np.stack([np.full((40, 40), v, dtype=np.float32) for v in (0.0, 1.0, 2.0)])
    spec = spec2d(flip_axes=[-1, -2], **OFF)
    for seed in range(8):
        out = multi_crop(img, spec, np.random.default_rng(seed), 3, "none")
        for crop in out["global_crops"] + out["local_crops"]:
            torch.testing.assert_close(crop.mean(dim=(1, 2)), torch.tensor([0.0, 1.0, 2.0]))


def test_first_global_crop_is_blurred_second_is_not():
    img = np.random.default_rng(0).normal(size=(1, 64, 64)).astype(np.float32)
    spec = spec2d(flip_axes=[], blur_p=(1.0, 0.0, 0.0), blur_sigma=(2.0, 2.0), noise_p=0.0, intensity_p=0.0, gamma_p=0.0)
    for seed in range(5):
        g1, g2 = multi_crop(img, spec, np.random.default_rng(seed), 1)["global_crops"]
        roughness = [(g[:, :, 1:] - g[:, :, :-1]).abs().mean().item() / g.std().item() for g in (g1, g2)]
        assert roughness[0] < 0.5 * roughness[1]


def test_ct_windows_give_unit_range_crops_from_raw_hu():
    hu = np.random.default_rng(0).integers(-1024, 2000, size=(1, 16, 32, 32)).astype(np.int16)
    spec = MultiCropSpec(
        global_size=(8, 16, 16), local_size=(4, 8, 8), n_local=2, rotation_degrees=15.0,
        ct_windows=[(-600, 1500), (40, 400), (400, 1800)], **OFF,
    )
    out = multi_crop(hu, spec, np.random.default_rng(0), 1, "zscore", "ct")
    crops = out["global_crops"] + out["local_crops"]
    assert all(c.min() >= 0.0 and c.max() <= 1.0 for c in crops)
    # Windowed from raw HU: z-scores (about -2..2) would span less than 0.02 of even the narrowest window.
    assert all(c.max() - c.min() > 0.1 for c in crops)


def test_collate_is_crop_major():
    def sample(b):
        return {
            "global_crops": [torch.full((1, 4, 4), 10.0 * b + i) for i in range(2)],
            "local_crops": [torch.full((1, 2, 2), 100.0 + 10.0 * b + i) for i in range(3)],
        }

    batch = collate_crops([sample(b) for b in range(4)])
    assert batch["global_crops"].shape == (8, 1, 4, 4) and batch["local_crops"].shape == (12, 1, 2, 2)
    assert batch["global_crops"][:, 0, 0, 0].tolist() == [0, 10, 20, 30, 1, 11, 21, 31]
    assert batch["local_crops"][:, 0, 0, 0].tolist() == [100, 110, 120, 130, 101, 111, 121, 131, 102, 112, 122, 132]


def test_collate_real_crops_and_no_locals():
    spec = spec2d(n_local=0)
    samples = [multi_crop(image2d(s), spec, np.random.default_rng(s), 3) for s in range(3)]
    batch = collate_crops(samples)
    assert batch["global_crops"].shape == (6, 3, 48, 48)
    assert torch.equal(batch["global_crops"][4], samples[1]["global_crops"][1])
    assert batch["local_crops"].shape[:2] == (0, 3) and batch["local_crops"].ndim == 4
    with pytest.raises(ValueError, match="different numbers"):
        collate_crops([samples[0], {"global_crops": samples[1]["global_crops"][:1], "local_crops": []}])


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(global_size=(48, 48), local_size=(24, 24, 24)), "one entry per spatial axis"),
        (dict(global_size=(48,), local_size=(24,)), "global_size"),
        (dict(global_scale=(0.0, 1.0)), "global_scale"),
        (dict(local_scale=(0.05, 1.5)), "local_scale"),
        (dict(n_global=0), "n_global"),
        (dict(flip_axes=[2]), "flip_axes"),
        (dict(blur_p=(1.0, 0.1)), "blur_p"),
        (dict(noise_p=1.5), "noise_p"),
        (dict(ct_windows=[(40, 0)]), "ct_windows"),
    ],
)
def test_spec_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        MultiCropSpec(**kw)


def test_wrong_dimensionality_and_grayscale_colour_jitter_name_the_sample():
    vol = np.zeros((1, 8, 8, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="scan-7"):
        multi_crop(vol, spec2d(), np.random.default_rng(0), 1, key="scan-7")
    with pytest.raises(ValueError, match="xray-3.*3 channels"):
        multi_crop(image2d(), spec2d(color_jitter=True), np.random.default_rng(0), 1, key="xray-3")
    out = multi_crop(image2d(channels=3), spec2d(color_jitter=True), np.random.default_rng(0), 3, "range")
    assert out["global_crops"][0].shape == (3, 48, 48)
