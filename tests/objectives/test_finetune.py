"""The ``finetune`` objective and protocol: layer-wise lr decay, the losses, labels, learning and exact resume."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from safetensors.torch import save_file

from pretrain.config.typed import ConfigError
from pretrain.data.codec import encode_sample
from pretrain.eval.finetune import _class_weights, finetune_and_predict, finetune_config, label_counts
from pretrain.models.backbones import ModelConfig, build_backbone
from pretrain.objectives import build_objective
from pretrain.objectives.finetune import sample_target
from tests.engine.conftest import read_losses
from tests.eval.test_features import write_shard

MODEL = ModelConfig(spatial_dims=2, img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                    pos_embed="sincos")
FAST = ["data.num_workers=0", "train.threads=1", "train.log_every=1"]


def _findings_shard(path, n, seed):
    """Two findings per image, independent: a bright top half, a bright left half."""
    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            top, left = int(rng.random() < 0.5), int(rng.random() < 0.3)
            img = rng.normal(0, 1, size=(1, 16, 16)).astype(np.float32)
            img[0, :8] += 2.0 * top
            img[0, :, :8] += 2.0 * left
            sink.write(encode_sample(f"m{seed}_{i:04d}", img, {"labels": [top, left]}))
    return str(path)


def test_layer_decay_gives_block_i_of_L_decay_to_the_power_L_minus_i(tmp_path):
    shard = write_shard(tmp_path / "t.tar", 8, 0)
    cfg = finetune_config("", replace(MODEL, depth=3), shard, str(tmp_path / "r"),
                          steps=4, intensity="zscore", seed=0)
    obj = build_objective(cfg)
    scale = {}
    for g in obj.param_groups():
        for p in g["params"]:
            scale[next(n for n, q in obj.named_parameters() if q is p)] = g["lr_scale"]
    assert set(scale) == {n for n, q in obj.named_parameters() if q.requires_grad}  # sin-cos table: frozen
    d = cfg.objective.layer_decay
    assert scale["backbone.patch_embed.proj.weight"] == pytest.approx(d ** 4)  # embeddings: d ** (L + 1)
    assert scale["backbone.cls_token"] == pytest.approx(d ** 4)
    for i in range(3):
        assert scale[f"backbone.blocks.{i}.attn.qkv.weight"] == pytest.approx(d ** (3 - i))
    assert scale["head.weight"] == scale["backbone.norm.weight"] == 1.0
    assert cfg.objective.num_classes == 4 and cfg.model.drop_path_rate > 0


def test_single_label_loss_and_imbalance_weights(tmp_path):
    counts = Counter({0: 90, 1: 10})
    assert _class_weights(counts, None) == pytest.approx([100 / 180, 100 / 20])  # n / (classes * count)
    assert _class_weights(Counter({0: 11, 1: 10}), None) == []  # near-balanced: equal weights
    assert _class_weights(Counter({0: 3, 1: 1, "__n__": 4}), 2) == pytest.approx([1 / 3, 3.0])  # negatives / positives
    shard = write_shard(tmp_path / "t.tar", 8, 0)
    cfg = finetune_config("", MODEL, shard, str(tmp_path / "r"), steps=4, intensity="zscore", seed=0,
                          overrides=["objective.class_weights=[1.0,2.0,3.0,4.0]", "objective.head_init_std=0.5"])
    obj = build_objective(cfg).eval()
    torch.manual_seed(1)
    x, y = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 3, 1, 2])
    z = obj.logits(x)
    eps, w = cfg.objective.label_smoothing, torch.tensor([1.0, 2.0, 3.0, 4.0])
    target = F.one_hot(y, 4) * (1 - eps) + eps / 4
    # torch's weighted, smoothed cross-entropy: each sample's weighted terms over the sum of the true classes' weights
    per = -(target * w * z.log_softmax(-1)).sum(-1)
    expected = per.sum() / w[y].sum()
    assert obj({"image": x, "target": y})["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_multi_label_loss_is_weighted_binary_cross_entropy(tmp_path):
    shard = _findings_shard(tmp_path / "m.tar", 40, 0)
    counts, findings = label_counts(shard)
    assert findings == 2 and counts["__n__"] == 40
    cfg = finetune_config("", MODEL, shard, str(tmp_path / "r"), steps=4, intensity="zscore", seed=0,
                          overrides=["objective.head_init_std=0.5"])
    assert cfg.objective.multi_label and len(cfg.objective.class_weights) == 2
    obj = build_objective(cfg).eval()
    x, y = torch.randn(5, 1, 16, 16), torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0]]).float()
    z, pw = obj.logits(x), torch.tensor(cfg.objective.class_weights)
    expected = -(pw * y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z)).mean()
    assert obj({"image": x, "target": y})["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(obj.predict(x), z.sigmoid())


def test_bad_labels_name_the_sample_or_key(tmp_path):
    with pytest.raises(ValueError, match=r"sample 'k7'.*\.cls label in 0\.\.3, got 9"):
        sample_target({"__key__": "k7", "__url__": "a.tar", "label": 9}, 4, False)
    with pytest.raises(ValueError, match=r"sample 'k8'.*meta 'labels' with 3 entries"):
        sample_target({"__key__": "k8", "meta": {"labels": [1, 0]}}, 3, True)
    with wds.TarWriter(str(tmp_path / "u.tar")) as sink:
        sink.write(encode_sample("nolabel", np.zeros((1, 16, 16), np.float32), {}))
    with pytest.raises(ValueError, match="sample 'nolabel' has no label"):
        label_counts(str(tmp_path / "u.tar"))
    with wds.TarWriter(str(tmp_path / "one.tar")) as sink:
        for i in range(3):
            sink.write(encode_sample(f"s{i}", np.zeros((1, 16, 16), np.float32), {"label": 2}))
    with pytest.raises(ValueError, match="at least two classes, found \\[2\\]"):
        label_counts(str(tmp_path / "one.tar"))
    with pytest.raises(ConfigError, match="objective.num_classes"):
        finetune_config("", MODEL, write_shard(tmp_path / "t.tar", 8, 0), str(tmp_path / "r"), steps=4,
                        intensity="zscore", seed=0, overrides=["objective.num_classes=1"])


def test_init_from_a_non_vit_backbone_loads_its_own_weights_strictly(tmp_path):
    from pretrain.objectives.base import load_init_weights

    cnn = ModelConfig(name="timm:resnet18", spatial_dims=2, img_size=32, in_chans=1)
    torch.manual_seed(0)
    src = build_backbone(cnn)
    torch.manual_seed(1)
    dst = build_backbone(cnn)
    save_file({f"backbone.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    report = load_init_weights(dst, str(tmp_path / "w.safetensors"), cnn.name)
    assert report == {"loaded": len(src.state_dict()), "prefix": "backbone."}
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match=r"other.safetensors does not hold this 'timm:resnet18' backbone's weights"):
        load_init_weights(dst, str(tmp_path / "other.safetensors"), cnn.name)
    with pytest.raises(ConfigError, match="objective.init_from.*no such file"):
        load_init_weights(dst, str(tmp_path / "absent.safetensors"), cnn.name)


def test_finetuning_learns_and_resumes_exactly(tmp_path):
    train, val = write_shard(tmp_path / "train.tar", 96, 0), write_shard(tmp_path / "val.tar", 48, 1)
    init = tmp_path / "init.safetensors"
    torch.manual_seed(3)
    save_file(build_backbone(MODEL).state_dict(), str(init))
    common = dict(steps=30, intensity="zscore", overrides=FAST + ["train.ckpt_every=15", "train.keep_checkpoints=2"])
    whole = tmp_path / "whole"
    pred = finetune_and_predict(str(init), MODEL, train, {"val": val}, str(whole), **common)["val"]
    acc = (pred["scores"].argmax(1) == pred["labels"]).float().mean().item()
    assert acc > 0.5, f"fine-tuning reached {acc:.1%} on 4 balanced classes (chance 25%)"
    assert pred["keys"] == [f"s1_{i:04d}" for i in range(48)]
    torch.testing.assert_close(pred["scores"].sum(1), torch.ones(48))

    # as if killed after step 15's checkpoint: the last checkpoint and the summary never written
    part = tmp_path / "part"
    shutil.copytree(whole, part)
    shutil.rmtree(part / "checkpoints" / "step_00000030")
    (part / "summary.json").unlink()
    (part / "checkpoints" / "latest").write_text("step_00000015")
    again = finetune_and_predict(str(init), MODEL, train, {"val": val}, str(part), **common)["val"]
    a, b = read_losses(whole), read_losses(part)
    assert sorted(b) == list(range(1, 31))
    assert [b[s] for s in range(16, 31)] == [a[s] for s in range(16, 31)]
    assert torch.equal(again["scores"], pred["scores"])
    assert json.loads((part / "summary.json").read_text())["steps"] == 30
