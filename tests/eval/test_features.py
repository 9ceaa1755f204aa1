"""Streamed feature extraction and its cache: shard order, masks, reuse, invalidation."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import webdataset as wds

from pretrain.data.codec import encode_sample
from pretrain.eval.features import (cached_features, encoder_readings, mask_label_map, pixel_readings, stream_features,
                                    weights_digest)
from pretrain.eval.suite import SuiteData
from pretrain.models.backbones import ModelConfig, build_backbone


def write_shard(path, n, seed, *, masks=True, patient_every=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            label = i % 4
            img = rng.normal(0, 1, size=(1, 16, 16)).astype(np.float32)
            q = label
            img[0, (q // 2) * 8:(q // 2) * 8 + 8, (q % 2) * 8:(q % 2) * 8 + 8] += 3.0
            mask = np.zeros((1, 16, 16), np.uint8)
            mask[0, (q // 2) * 8:(q // 2) * 8 + 8, (q % 2) * 8:(q % 2) * 8 + 8] = 1 + q % 2
            meta = {"label": label, "label_name": f"quadrant{label}", "mask_labels": {"background": 0, "left": 1, "right": 2}}
            if patient_every:
                meta["patient"] = f"p{i // patient_every}"
            sink.write(encode_sample(f"s{seed}_{i:04d}", img, meta, text=f"bright quadrant {label}",
                                     mask=mask if masks else None))
    return str(path)


def _data(**kw) -> SuiteData:
    return SuiteData("", "", None, (16, 16), 1, "zscore", grid=(4, 4), **kw)


def _vit():
    torch.manual_seed(0)
    return build_backbone(ModelConfig(spatial_dims=2, img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=4,
                                      num_heads=2, pos_embed="sincos"))


def test_rows_come_in_shard_order_with_labels_masks_and_patients(tmp_path):
    spec = write_shard(tmp_path / "a.tar", 37, 0, patient_every=3)
    data = _data()
    fs = stream_features(pixel_readings((4, 4), (4, 4)), spec, data.view, batch_size=8, mask_view=data.mask_view, texts=True)
    assert fs.keys == [f"s0_{i:04d}" for i in range(37)]
    assert fs.labels.tolist() == [i % 4 for i in range(37)]
    assert fs.groups == [f"p{i // 3}" for i in range(37)] and fs.texts[5] == "bright quadrant 1"
    assert fs.label_names == [f"quadrant{c}" for c in range(4)] and fs.mask_labels["right"] == 2
    assert fs.masks.shape == (37, 16, 16) and fs.masks.dtype == torch.uint8
    # a pixel token is its cell's pixels, in the cell's own row-major order
    assert fs.tokens.shape == (37, 4, 4, 16) and fs.features["pixels"].shape == (37, 16)
    first = torch.stack([data.view(s) for s in _samples(spec)[:1]])[0, 0]
    assert torch.allclose(fs.tokens[0, 1, 2].float(), first[4:8, 8:12].reshape(-1).half().float())


def _samples(spec):
    from pretrain.eval.features import _iter_samples

    return list(_iter_samples(spec))


def test_encoder_readings_match_a_direct_forward(tmp_path):
    spec = write_shard(tmp_path / "a.tar", 10, 0)
    vit = _vit()
    fs = stream_features(encoder_readings(vit, ("cls", "mean", "last4", "tokens")), spec, _data().view, batch_size=4)
    x = torch.stack([_data().view(s) for s in _samples(spec)])
    vit.eval()
    with torch.no_grad():
        tokens = vit.forward_features(x)
        shorter = copy.deepcopy(vit)  # without its last block: the class token after block depth-1, normed
        shorter.blocks = shorter.blocks[:-1]
        before_last = shorter.forward_features(x)[:, 0]
    assert torch.allclose(fs.features["cls"], tokens[:, 0], atol=1e-6)
    assert torch.allclose(fs.features["mean"], tokens[:, 1:].mean(1), atol=1e-6)
    assert torch.allclose(fs.tokens.float(), tokens[:, 1:].reshape(10, 4, 4, -1), atol=1e-2)
    assert fs.features["last4"].shape == (10, 4 * 16)
    # the last of the four is the final class token
    assert torch.allclose(fs.features["last4"][:, -16:], tokens[:, 0], atol=1e-6)
    assert torch.allclose(fs.features["last4"][:, -32:-16], before_last, atol=1e-6)


def test_the_cache_is_reused_and_invalidated_by_weights_or_data(tmp_path):
    spec = write_shard(tmp_path / "a.tar", 12, 0)
    calls = []
    vit = _vit()

    def extract():
        calls.append(1)
        return stream_features(encoder_readings(vit, ("cls",)), spec, _data().view, batch_size=4)

    key = {"view": 1}
    first = cached_features(weights_digest(vit), spec, key, extract, tmp_path / "cache")
    again = cached_features(weights_digest(vit), spec, key, extract, tmp_path / "cache")
    assert len(calls) == 1 and torch.equal(first.features["cls"], again.features["cls"]) and again.keys == first.keys
    with torch.no_grad():
        vit.blocks[0].attn.qkv.weight.add_(1e-3)  # a changed encoder is a miss
    cached_features(weights_digest(vit), spec, key, extract, tmp_path / "cache")
    assert len(calls) == 2
    cached_features(weights_digest(vit), spec, {"view": 2}, extract, tmp_path / "cache")  # another view: a miss
    assert len(calls) == 3
    write_shard(tmp_path / "a.tar", 12, 1)  # rewritten shards: a miss
    os.utime(tmp_path / "a.tar", ns=(1, 1))
    cached_features(weights_digest(vit), spec, key, extract, tmp_path / "cache")
    assert len(calls) == 4
    # a damaged cache file is only a miss
    for f in (tmp_path / "cache").iterdir():
        f.write_bytes(b"garbage")
    cached_features(weights_digest(vit), spec, key, extract, tmp_path / "cache")
    assert len(calls) == 5


def test_mask_labels_come_as_the_codecs_list_or_a_mapping():
    sample = {"__url__": "a.tar", "__key__": "k"}
    assert mask_label_map(["background", "lung"], sample) == {"background": 0, "lung": 1}
    assert mask_label_map({"background": 0, "lesion": 3}, sample) == {"background": 0, "lesion": 3}
    with pytest.raises(ValueError, match="sample 'k': meta 'mask_labels' must be"):
        mask_label_map("lung", sample)
