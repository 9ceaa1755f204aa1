"""The linear dense probe: it finds segmentations the tokens encode, scores them right, and chooses on training data only."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.eval.segment import (
    _interpolation_matrix, dice_iou_from_stats, segment_probe, segmentation_stats,
)

K = 4  # background and three foreground classes
WDS = (1e-4, 1e-2)


def _synthetic(n: int, coarse, grid, spatial, signal: float, seed: int, dims: int = 16):
    """Tokens whose first K channels one-hot encode their grid cell's class (plus unit noise), and the
    label maps those classes make when upsampled by nearest. Labels come in blocks of cells, so that
    most cell borders are not class borders (a bilinear head can only blur across those)."""
    g = torch.Generator().manual_seed(seed)
    coarse_labels = torch.randint(0, K, (n, *coarse), generator=g)
    cells = F.interpolate(coarse_labels[:, None].float(), size=grid, mode="nearest")[:, 0].long()
    tokens = torch.randn(n, *grid, dims, generator=g)
    tokens[..., :K] += signal * F.one_hot(cells, K)
    masks = F.interpolate(cells[:, None].float(), size=spatial, mode="nearest")[:, 0].long()
    return tokens.half(), masks  # tokens as a cache stores them


def _numpy_scores(pred: np.ndarray, true: np.ndarray) -> dict[str, np.ndarray]:
    """Dice and IoU per class over all pixels of all images, directly from the label maps."""
    dice, iou = np.full(K, np.nan), np.full(K, np.nan)
    for k in range(K):
        p, t = pred == k, true == k
        inter, union = np.logical_and(p, t).sum(), np.logical_or(p, t).sum()
        if union:
            dice[k], iou[k] = 2 * inter / (p.sum() + t.sum()), inter / union
    return {"dice": dice, "iou": iou}


@pytest.fixture(scope="module")
def data_2d():
    shape = dict(coarse=(4, 4), grid=(8, 8), spatial=(32, 32))
    return _synthetic(64, signal=5.0, seed=0, **shape), _synthetic(32, signal=5.0, seed=1, **shape)


@pytest.fixture(scope="module")
def result_2d(data_2d):
    (xt, mt), (xv, mv) = data_2d
    return segment_probe(xt, mt, xv, mv, num_classes=K, weight_decays=WDS, max_iter=50, return_predictions=True)


def test_upsampling_is_bilinear_and_trilinear_interpolation():
    g = torch.Generator().manual_seed(0)
    for grid, size, mode in (((5, 3), (17, 8), "bilinear"), ((3, 4, 2), (7, 9, 6), "trilinear")):
        x = torch.randn(2, 3, *grid, generator=g)
        ours = x
        for axis, (n_in, n_out) in enumerate(zip(grid, size)):
            ours = (ours.movedim(2 + axis, -1) @ _interpolation_matrix(n_in, n_out, x.device).T).movedim(-1, 2 + axis)
        assert torch.allclose(ours, F.interpolate(x, size=size, mode=mode, align_corners=False), atol=1e-5)


def test_2d_probe_recovers_encoded_classes_and_not_noise(data_2d, result_2d):
    assert all(result_2d.dice[str(k)] > 0.9 for k in range(1, K))
    assert result_2d.mean_dice > 0.9 and result_2d.mean_iou > 0.8 and result_2d.pixel_accuracy > 0.9
    (xt, mt), (xv, mv) = data_2d
    g = torch.Generator().manual_seed(5)
    noise = segment_probe(torch.randn(xt.shape, generator=g), mt, torch.randn(xv.shape, generator=g), mv,
                          num_classes=K, weight_decays=WDS, max_iter=50)
    # four equally frequent classes: a guess scores about 1/4; predicting one class everywhere, 0.4 for it
    assert noise.mean_dice < 0.35 and max(noise.dice[str(k)] for k in range(1, K)) < 0.45


def test_3d_probe_recovers_encoded_classes_and_not_noise():
    shape = dict(coarse=(2, 2, 2), grid=(4, 4, 4), spatial=(16, 16, 16))
    (xt, mt), (xv, mv) = _synthetic(32, signal=5.0, seed=2, **shape), _synthetic(16, signal=5.0, seed=3, **shape)
    names = ["background", "a", "b", "c"]
    result = segment_probe(xt, mt, xv, mv, num_classes=K, weight_decays=WDS, max_iter=50, class_names=names)
    assert list(result.dice) == names and all(result.dice[c] > 0.9 for c in names[1:])
    noise = segment_probe(torch.randn(xt.shape), mt, torch.randn(xv.shape), mv, num_classes=K,
                          weight_decays=WDS, max_iter=50)
    assert noise.mean_dice < 0.35


def test_scores_match_a_direct_computation_and_the_stats_recompute_them(data_2d, result_2d):
    (_, _), (_, mv) = data_2d
    pred, true = result_2d.predictions, mv.numpy()
    assert pred.shape == true.shape
    direct = _numpy_scores(pred, true)
    assert np.allclose([result_2d.dice[str(k)] for k in range(K)], direct["dice"])
    assert np.allclose([result_2d.iou[str(k)] for k in range(K)], direct["iou"])
    assert np.isclose(result_2d.mean_dice, direct["dice"][1:].mean())  # foreground only
    assert np.isclose(result_2d.mean_iou, direct["iou"][1:].mean())
    assert np.isclose(result_2d.pixel_accuracy, (pred == true).mean())
    everything = dice_iou_from_stats(result_2d.stats, np.arange(len(true)))
    assert everything["mean_dice"] == result_2d.mean_dice and everything["mean_iou"] == result_2d.mean_iou
    assert all(everything[f"dice/{k}"] == result_2d.dice[str(k)] for k in range(K))
    # a bootstrap resample (repeats included) is the same as scoring the resampled images directly
    idx = np.random.default_rng(0).integers(0, len(true), size=len(true))
    resampled, direct = dice_iou_from_stats(result_2d.stats, idx), _numpy_scores(pred[idx], true[idx])
    assert np.allclose([resampled[f"dice/{k}"] for k in range(K)], direct["dice"])
    assert np.allclose([resampled[f"iou/{k}"] for k in range(K)], direct["iou"])
    assert np.isclose(resampled["mean_dice"], direct["dice"][1:].mean())


def test_stats_of_given_predictions():
    g = torch.Generator().manual_seed(1)
    true = torch.randint(0, K, (6, 10, 12), generator=g)
    pred = torch.where(torch.rand(true.shape, generator=g) < 0.7, true, torch.randint(0, K, true.shape, generator=g))
    pred[pred == 3] = 2  # class 3 is never predicted: Dice 0, not undefined
    true[:3][true[:3] == 1] = 0
    pred[:3][pred[:3] == 1] = 0  # images 0..2 have no class 1 at all: there it is undefined
    stats = segmentation_stats(pred, true, K)
    for idx in (np.arange(6), np.array([0, 2, 4, 4])):
        ours, direct = dice_iou_from_stats(stats, idx), _numpy_scores(pred.numpy()[idx], true.numpy()[idx])
        assert np.allclose([ours[f"dice/{k}"] for k in range(K)], direct["dice"], equal_nan=True)
        assert np.allclose([ours[f"iou/{k}"] for k in range(K)], direct["iou"], equal_nan=True)
        assert ours["dice/3"] == 0
    with pytest.raises(IndexError):
        dice_iou_from_stats(stats, [-1])
    only_empty = dice_iou_from_stats(stats, [0, 1, 2])
    assert np.isnan(only_empty["dice/1"])
    assert np.isclose(only_empty["mean_dice"], (only_empty["dice/2"] + only_empty["dice/3"]) / 2)  # NaN left out


def test_validation_masks_never_influence_the_choice(data_2d, result_2d):
    (xt, mt), (xv, mv) = data_2d
    scrambled = torch.randint(0, K, mv.shape, generator=torch.Generator().manual_seed(9))
    other = segment_probe(xt, mt, xv, scrambled, num_classes=K, weight_decays=WDS, max_iter=50)
    assert other.weight_decay == result_2d.weight_decay and other.selection_dice == result_2d.selection_dice
    assert other.mean_dice < 0.5 < result_2d.mean_dice


def test_deterministic_and_independent_of_the_mini_batching(data_2d, result_2d):
    (xt, mt), (xv, mv) = data_2d
    again = segment_probe(xt, mt, xv, mv, num_classes=K, weight_decays=WDS, max_iter=50, return_predictions=True)
    assert again.dice == result_2d.dice and again.selection_dice == result_2d.selection_dice
    for field in ("intersection", "predicted", "target"):
        assert np.array_equal(getattr(again.stats, field), getattr(result_2d.stats, field))
    assert np.array_equal(again.predictions, result_2d.predictions)
    # a few images per mini-batch: the same loss and gradients up to rounding, so (nearly) the same probe
    small = segment_probe(xt, mt, xv, mv, num_classes=K, weight_decays=WDS, max_iter=50, chunk_elements=5 * 32 * 32 * 8)
    # (the weight decays score within rounding of each other here, so which one wins may flip)
    assert all(abs(small.selection_dice[w] - result_2d.selection_dice[w]) < 2e-3 for w in WDS)
    assert abs(small.mean_dice - result_2d.mean_dice) < 2e-3


def test_masks_at_any_resolution():
    (xt, mt), (xv, mv) = (_synthetic(48, (4, 4), (8, 8), (32, 32), 5.0, s) for s in (6, 7))
    # 30 px is no multiple of the 8-cell grid: the logits are interpolated to it all the same
    shrink = lambda m: F.interpolate(m[:, None].float(), size=(30, 30), mode="nearest")[:, 0].long()  # noqa: E731
    result = segment_probe(xt, shrink(mt), xv, shrink(mv), num_classes=K, weight_decays=WDS, max_iter=50,
                           return_predictions=True)
    assert result.predictions.shape == (48, 30, 30) and result.mean_dice > 0.85
    assert result.stats.target.sum() == 48 * 30 * 30
