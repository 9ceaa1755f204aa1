"""Frozen-feature evaluation beside its baselines, on shards whose answer is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import webdataset as wds

from pretrain.data.codec import encode_sample
from pretrain.data.transforms import eval_view
from pretrain.eval.frozen import FrozenEvalData, evaluate_encoder, evaluate_pixels, gains
from pretrain.models.backbones import ModelConfig, build_backbone


def _write(path, n, seed, informative: bool):
    """Images whose class is which quadrant is bright (informative) or unrelated to the pixels."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            label = i % 4
            img = rng.normal(0, 1, size=(1, 16, 16)).astype(np.float32)
            q = label if informative else rng.integers(4)
            img[0, (q // 2) * 8:(q // 2) * 8 + 8, (q % 2) * 8:(q % 2) * 8 + 8] += 3.0
            sink.write(encode_sample(f"s{i:04d}", img, {"label": label}))
    return str(path)


def _data(tmp_path, informative):
    view = lambda s: eval_view(s["image"], (16, 16), 1, "zscore", key=s["__key__"])  # noqa: E731
    return FrozenEvalData(_write(tmp_path / "train.tar", 200, 0, informative), _write(tmp_path / "val.tar", 100, 1, informative),
                          view, k=10, batch_size=32)


@pytest.mark.parametrize("informative", [True, False])
def test_raw_pixels_read_what_is_in_the_pixels_and_nothing_else(tmp_path, informative):
    result = evaluate_pixels((4, 4), _data(tmp_path, informative))
    if informative:
        assert result["knn"] > 0.95 and result["linear"] > 0.95
    else:
        assert result["knn"] < 0.45 and result["linear"] < 0.45
    assert result["linear_features"] == "pixels"


def test_encoder_evaluation_reads_class_and_mean_tokens_and_the_method_pool(tmp_path):
    torch.manual_seed(0)
    encoder = build_backbone(ModelConfig(preset="nano", spatial_dims=2, img_size=16, patch_size=4, in_chans=1))
    result = evaluate_encoder(encoder, _data(tmp_path, True), pool="mean")
    assert {"knn_cls", "knn_mean", "knn", "linear", "linear_features", "linear_weight_decay"} <= set(result)
    assert result["knn"] == result["knn_mean"]
    assert result["linear_features"] in ("cls", "mean", "cls+mean")
    assert all(0.0 <= result[k] <= 1.0 for k in ("knn_cls", "knn_mean", "linear"))
    assert encoder.training  # evaluation leaves the train/eval mode as it found it


def test_gain_is_over_the_better_baseline_for_each_protocol():
    pre = {"linear": 0.8, "knn_cls": 0.5, "knn_mean": 0.7, "knn": 0.5}
    baselines = {"raw_pixels": {"linear": 0.3, "knn": 0.6}, "random_init": {"linear": 0.4, "knn_cls": 0.2, "knn_mean": 0.3, "knn": 0.2}}
    assert gains(pre, baselines) == pytest.approx({"linear": 0.4, "knn": 0.1})
    assert gains(pre, {}) == {}
