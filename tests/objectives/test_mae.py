"""MAE: patch layout, masking, loss, CPU transform, visualisation, 2D and 3D."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.config import load_config
from pretrain.objectives import build_objective
from pretrain.objectives.mae import patchify, unpatchify

TINY = ["model.preset=nano", "objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2"]


def make(*overrides):
    torch.manual_seed(0)
    return build_objective(load_config("configs/demo.yaml", [*TINY, *overrides]))


def test_patchify_matches_unfold_and_round_trips():
    x = torch.randn(2, 3, 16, 24)
    patches = patchify(x, (8, 8))
    # F.unfold gives (B, C*p*p, N) with channel-major patch vectors; ours is channel-last.
    ref = F.unfold(x, kernel_size=8, stride=8).transpose(1, 2).reshape(2, 6, 3, 64).transpose(2, 3).reshape(2, 6, 192)
    torch.testing.assert_close(patches, ref)
    torch.testing.assert_close(unpatchify(patches, (8, 8), (2, 3), 3), x)
    vol = torch.randn(1, 1, 8, 16, 8)
    p3 = patchify(vol, (4, 4, 4))
    assert p3.shape == (1, 2 * 4 * 2, 64)
    torch.testing.assert_close(p3[0, 1], vol[0, 0, :4, :4, 4:8].reshape(-1))  # second patch: next along the last axis
    torch.testing.assert_close(unpatchify(p3, (4, 4, 4), (2, 4, 2), 1), vol)


def test_masking_keeps_exactly_the_lowest_noise_patches():
    mae = make()
    noise = torch.rand(3, mae.num_patches)
    keep, restore, mask = mae.masking(noise)
    assert keep.shape == (3, mae.len_keep) and mae.len_keep == 16  # 64 patches, ratio 0.75
    assert mask.sum(dim=1).tolist() == [mae.num_patches - mae.len_keep] * 3
    for b in range(3):
        expected = set(noise[b].argsort()[: mae.len_keep].tolist())
        assert set(keep[b].tolist()) == expected
        assert set(torch.nonzero(mask[b] == 0).flatten().tolist()) == expected
        # restore inverts the shuffle
        shuffle = noise[b].argsort()
        assert torch.equal(shuffle[restore[b]], torch.arange(mae.num_patches))


def test_loss_is_normalised_mse_on_masked_patches_only():
    mae = make()
    batch = mae.data_recipe().collate([mae.data_recipe().transform(s) for s in samples(4)])
    out = mae(batch)
    target = patchify(batch["image"], mae.patch)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((out["_pred"] - target) ** 2).mean(-1)
    mask = out["_mask"]
    expected = sum(per_patch[b, n] for b in range(4) for n in range(mae.num_patches) if mask[b, n]) / mask.sum()
    torch.testing.assert_close(out["loss"], expected.float())
    assert not torch.isclose(out["loss"], out["visible_mse"])  # visible patches are not in the loss
    out["loss"].backward()
    assert mae.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert mae.mask_token.grad.abs().sum() > 0


def test_unnormalised_target_is_raw_pixels():
    mae = make("objective.norm_pix_loss=false")
    x = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(mae.target(x), patchify(x, mae.patch))


def samples(n, shape=(1, 64, 64), dtype=np.uint16, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"__key__": f"s{i}", "__seed__": 100 + i, "image": rng.integers(0, 4000, size=shape).astype(dtype), "meta": {}, "label": 0}
        for i in range(n)
    ]


def test_transform_is_deterministic_per_seed_and_varies_across_seeds():
    mae = make()
    s = samples(1)[0]
    a, b = mae.data_recipe().transform(dict(s)), mae.data_recipe().transform(dict(s))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask_noise"], b["mask_noise"])
    c = mae.data_recipe().transform(dict(s, __seed__=7))
    assert not torch.equal(a["image"], c["image"])
    assert a["image"].shape == (1, 64, 64) and a["image"].dtype == torch.float32


def test_transform_rejects_wrong_dimensionality_naming_the_sample():
    mae = make()
    bad = samples(1, shape=(1, 8, 64, 64))[0]
    with pytest.raises(ValueError, match="'s0'.*2D image"):
        mae.data_recipe().transform(bad)
    two = samples(1, shape=(2, 64, 64))[0]
    with pytest.raises(ValueError, match="'s0' has 2 channels; the model takes 3"):
        make("model.in_chans=3").data_recipe().transform(two)


def test_3d_mae_trains_and_visualises_the_middle_slice():
    mae = make("model.spatial_dims=3", "model.img_size=16", "model.patch_size=4")
    batch = mae.data_recipe().collate([mae.data_recipe().transform(s) for s in samples(2, shape=(1, 20, 24, 24), dtype=np.int16)])
    assert batch["image"].shape == (2, 1, 16, 16, 16)
    out = mae(batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    images = mae.visualize(batch, out)
    (img,) = images.values()
    assert img.shape == (1, 16, 48) and 0 <= img.min() and img.max() <= 1


def test_flops_count_grows_with_mask_ratio_of_kept_tokens():
    low, high = make("objective.mask_ratio=0.9"), make("objective.mask_ratio=0.5")
    assert 0 < low.flops_per_sample() < high.flops_per_sample()
    assert low.tokens_per_sample() == round(64 * 0.1) + 1
