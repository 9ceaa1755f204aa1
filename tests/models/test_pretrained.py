"""Continued pretraining from timm / DINOv2 / our own weights, checked against the real timm."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from pretrain.config.load import config_to_dict
from pretrain.models.pos_embed import resample_pos_embed
from pretrain.models.pretrained import adapt_state_dict, load_pretrained, read_state_dict
from pretrain.models.vit import ViTConfig, VisionTransformer


def small(depth: int = 12, **kw) -> VisionTransformer:
    """Our ViT-S/16 (the "small" preset's widths, timm's vit_small_patch16_224); shallower ones build faster
    and load the source's first ``depth`` blocks."""
    cfg = {"embed_dim": 384, "depth": depth, "num_heads": 6, "patch_size": 16, "pos_embed": "learned", **kw}
    return VisionTransformer(ViTConfig(**cfg))


def nano(**kw) -> VisionTransformer:
    cfg = {"embed_dim": 64, "depth": 4, "num_heads": 2, "img_size": 28, "patch_size": 14, **kw}
    return VisionTransformer(ViTConfig(**cfg))


def timm_tokens(model, x):
    """timm's patch embedding without position, (B, N, D)."""
    return model.patch_embed.proj(x).flatten(2).transpose(1, 2)


@pytest.fixture(scope="module")
def timm_small():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10).eval()


@pytest.fixture(scope="module")
def timm_files(timm_small, tmp_path_factory):
    root = tmp_path_factory.mktemp("timm")
    state = {k: v.detach().clone() for k, v in timm_small.state_dict().items()}
    torch.save(state, root / "vit_s16.pth")
    save_file(state, str(root / "vit_s16.safetensors"))
    head = {"dino_head.last_layer.weight": torch.ones(8, 4)}
    wrapped = {"teacher": {**{"backbone." + k: v for k, v in state.items()}, **head}}
    torch.save(wrapped, root / "teacher_checkpoint.pth")
    return {"pth": root / "vit_s16.pth", "safetensors": root / "vit_s16.safetensors",
            "teacher": root / "teacher_checkpoint.pth"}


def test_rgb_timm_weights_into_grey_64px_model(timm_small, timm_files):
    ours = small(img_size=64, in_chans=1)
    report = load_pretrained(ours, timm_files["safetensors"])
    ref = timm_small.state_dict()
    assert report["prefix"] == ""
    ours_state = ours.state_dict()
    for key, value in ours_state.items():  # (1) blocks copied exactly
        if key.startswith(("blocks.", "norm.")):
            assert torch.equal(value, ref[key]), key
    # (2) RGB -> grey: summed kernel, and a grey image embeds as timm's embedding of it on 3 channels.
    torch.testing.assert_close(ours.patch_embed.proj.weight, ref["patch_embed.proj.weight"].sum(dim=1, keepdim=True))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.patch_embed(x), timm_tokens(timm_small, x.expand(-1, 3, -1, -1)),
                                   atol=1e-5, rtol=1e-5)
    # (3) 14x14 -> 4x4 bicubic patch table against timm's own resampler; class row copied.
    expected = resample_abs_pos_embed(ref["pos_embed"], new_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(ours.pos_embed.detach(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.pos_embed[:, 0], ref["pos_embed"][:, 0])
    assert report["adapted"]["pos_embed"]["from"] == (1, 197, 384)
    assert report["adapted"]["patch_embed.proj.weight"]["to"] == (384, 1, 16, 16)
    # (4) the classifier is dropped, nothing of the model is missing.
    assert {"head.weight", "head.bias"} <= set(report["dropped"])
    assert report["missing"] == [] and report["loaded"] == len(ours_state)


def test_pth_and_dinov2_wrapped_files_read_like_safetensors(timm_files):
    ours = small(depth=2, img_size=32, in_chans=1)
    reference, _ = adapt_state_dict(read_state_dict(timm_files["safetensors"]), ours)
    for kind, prefix in (("pth", ""), ("teacher", "backbone.")):
        adapted, report = adapt_state_dict(read_state_dict(timm_files[kind]), ours)
        assert report["prefix"] == prefix and report["missing"] == []
        assert adapted.keys() == reference.keys() and all(torch.equal(adapted[k], reference[k]) for k in adapted)
    assert report["dropped"]["dino_head.last_layer.weight"] == "outside prefix 'backbone.'"
    assert report["dropped"]["blocks.11.mlp.fc2.bias"] == "not in the model"


def test_same_shape_model_reproduces_timm_features(timm_small, timm_files):
    """(5) Every name maps exactly: the class-token output equals timm's at 224 px RGB.

    timm's pre-logits (token pool, then fc_norm = Identity) are its num_classes=0 output.
    """
    with torch.device("meta"):  # every tensor gets loaded: skip the (slow) random init
        ours = small(img_size=224, in_chans=3)
    ours = ours.to_empty(device="cpu").eval()
    report = load_pretrained(ours, timm_files["safetensors"])
    assert report["adapted"] == {} and report["missing"] == []
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = timm_small.forward_head(timm_small.forward_features(x), pre_logits=True)
        torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=1e-4)


def test_timm_dinov2_registers_no_embed_class_layout(tmp_path):
    """timm's DINOv2-with-registers layout: pos_embed has patch rows only, prefix tokens get no position."""
    torch.manual_seed(1)
    ref = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, depth=2, num_classes=0)
    ref.eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_file(ref.state_dict(), str(tmp_path / "reg4.safetensors"))
    ours = small(depth=2, img_size=56, patch_size=14, in_chans=3, num_register_tokens=4, layer_scale_init=1e-5).eval()
    report = load_pretrained(ours, tmp_path / "reg4.safetensors")
    assert report["missing"] == []
    assert torch.count_nonzero(ours.pos_embed[:, :5]) == 0
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


def test_official_dinov2_names_swiglu_registers_chunks(tmp_path):
    """DINOv2's own checkpoint names: register_tokens, fused w12/w3 SwiGLU, chunked blocks, mask_token."""
    torch.manual_seed(2)
    cfg = dict(in_chans=3, num_register_tokens=2, layer_scale_init=0.5, mlp="swiglu", mlp_ratio=8 / 3)
    src = nano(**cfg).eval()
    with torch.no_grad():
        src.pos_embed[:, 1:3] = 0  # DINOv2 gives registers no position
    official = {"mask_token": torch.zeros(1, 64)}
    for key, value in src.state_dict().items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = key.replace(f"blocks.{index}.", f"blocks.{index // 2}.{index}.")  # block_chunks=2
            if ".fc1_x." in key:
                continue
            if ".fc1_g." in key:
                value = torch.cat([value, src.state_dict()[key.replace(f"{index // 2}.{index}.", f"{index}.")
                                                           .replace("fc1_g", "fc1_x")]])
                key = key.replace("fc1_g", "w12")
            key = key.replace(".mlp.fc2.", ".mlp.w3.")
        elif key == "reg_token":
            key = "register_tokens"
        elif key == "pos_embed":
            value = torch.cat([value[:, :1], value[:, 3:]], dim=1)
        official[key] = value
    assert "blocks.1.3.mlp.w12.weight" in official
    torch.save({"teacher": {"backbone." + k: v for k, v in official.items()}}, tmp_path / "dinov2.pth")
    ours = nano(**cfg).eval()
    report = load_pretrained(ours, tmp_path / "dinov2.pth")
    assert report["missing"] == [] and "mask_token" in report["dropped"]
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), src(x), atol=1e-6, rtol=1e-6)


def test_wrong_prefix_or_architecture_names_the_source(timm_files, tmp_path):
    """(6)"""
    ours = small(depth=2, img_size=32)
    with pytest.raises(ValueError, match="teacher_checkpoint.pth: only 0 of .* prefix 'student.backbone.'"):
        load_pretrained(ours, timm_files["teacher"], prefix="student.backbone.")
    torch.manual_seed(3)
    tiny = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32)
    torch.save(tiny.state_dict(), tmp_path / "tiny.pth")
    before = ours.state_dict()["blocks.0.attn.qkv.weight"].clone()
    with pytest.raises(ValueError, match="tiny.pth: only 0 of"):
        load_pretrained(ours, tmp_path / "tiny.pth")
    assert torch.equal(ours.state_dict()["blocks.0.attn.qkv.weight"], before)
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 2)).state_dict(), tmp_path / "cnn.pt")
    with pytest.raises(ValueError, match="cnn.pt"):
        load_pretrained(ours, tmp_path / "cnn.pt")


def test_patch_14_to_16_rgb_to_grey_pseudo_inverse(tmp_path):
    """(7) A grey patch resized 14 -> 16 embeds exactly as the RGB source embeds the original."""
    torch.manual_seed(4)
    src = nano(in_chans=3)
    save_file(src.state_dict(), str(tmp_path / "p14.safetensors"))
    ours = nano(in_chans=1, img_size=32, patch_size=16)
    report = load_pretrained(ours, tmp_path / "p14.safetensors")
    how = report["adapted"]["patch_embed.proj.weight"]["how"]
    assert "channels 3 -> 1" in how and "pseudo-inverse" in how
    x = torch.randn(6, 1, 14, 14)
    resized = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(ours.patch_embed(resized), src.patch_embed(x.expand(-1, 3, -1, -1)),
                                   atol=1e-4, rtol=1e-4)
    shrunk = nano(in_chans=3, img_size=24, patch_size=12)
    report = load_pretrained(shrunk, tmp_path / "p14.safetensors")
    assert report["adapted"]["patch_embed.proj.weight"]["to"] == (64, 3, 12, 12)


@pytest.mark.parametrize("chans", [2, 3, 4, 5])
def test_channel_rule_keeps_the_grey_response(tmp_path, chans):
    src = nano(in_chans=3)
    save_file(src.state_dict(), str(tmp_path / "rgb.safetensors"))
    ours = nano(in_chans=chans)
    load_pretrained(ours, tmp_path / "rgb.safetensors")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours.patch_embed(x.expand(-1, chans, -1, -1)),
                                   src.patch_embed(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)


def test_own_export_and_checkpoint_round_trip(tmp_path):
    """(8) Our export folder (as tools/export/encoder.py writes it) and a DeepSpeed checkpoint of a run."""
    from pretrain.storage.checkpoints import fp32_state_dict, resolve_checkpoint
    from pretrain.tools.export.encoder import CONFIG, WEIGHTS, load_exported_encoder

    torch.manual_seed(5)
    cfg = ViTConfig(preset="nano", img_size=32, patch_size=8, num_register_tokens=2, layer_scale_init=1e-4)
    src = VisionTransformer(cfg)
    state = {k: v.detach().float().contiguous() for k, v in src.state_dict().items()}
    export = tmp_path / "export"
    export.mkdir()
    save_file(state, str(export / WEIGHTS))
    (export / CONFIG).write_text(json.dumps({"medpretrain": {"target": "timm", "model": {"name": "vit", **config_to_dict(cfg)}}}))
    load_exported_encoder(export)  # the folder is in the exporter's format (strict load there)
    ours = VisionTransformer(ViTConfig(**config_to_dict(cfg)))
    report = load_pretrained(ours, export)
    assert report["loaded"] == len(state) and not (report["adapted"] or report["dropped"] or report["missing"])
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000003"
    ckpt.mkdir(parents=True)
    module = {**{"backbone." + k: v for k, v in state.items()}, "decoder_pred.weight": torch.ones(4, 4)}
    torch.save({"module": module, "optimizer": None}, ckpt / "mp_rank_00_model_states.pt")
    (ckpt / "COMPLETE").write_text("3\n")
    (ckpt.parent / "latest").write_text("step_00000003\n")
    read = read_state_dict(tmp_path / "run")
    expected = fp32_state_dict(resolve_checkpoint(tmp_path / "run"))
    assert read.keys() == expected.keys() and all(torch.equal(read[k], expected[k]) for k in read)
    ours = VisionTransformer(ViTConfig(**config_to_dict(cfg)))
    report = load_pretrained(ours, tmp_path / "run" / "checkpoints")
    assert report["prefix"] == "backbone."
    assert report["dropped"] == {"decoder_pred.weight": "outside prefix 'backbone.'"}
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())


def test_3d_resample_and_no_2d_inflation(tmp_path):
    torch.manual_seed(6)
    src = VisionTransformer(ViTConfig(preset="nano", spatial_dims=3, img_size=32, patch_size=8))
    save_file(src.state_dict(), str(tmp_path / "vol.safetensors"))
    ours = VisionTransformer(ViTConfig(preset="nano", spatial_dims=3, img_size=48, patch_size=8))
    load_pretrained(ours, tmp_path / "vol.safetensors")
    expected = resample_pos_embed(src.pos_embed.detach(), (4, 4, 4), (6, 6, 6), num_prefix=1)
    torch.testing.assert_close(ours.pos_embed.detach(), expected)
    save_file(nano().state_dict(), str(tmp_path / "flat.safetensors"))
    with pytest.raises(ValueError, match=r"flat.safetensors.*\(64, 1, 14, 14\).*\(64, 1, 8, 8, 8\).*not supported"):
        load_pretrained(ours, tmp_path / "flat.safetensors")


def test_sincos_model_keeps_its_table(timm_files):
    ours = small(depth=2, img_size=64, pos_embed="sincos")
    table = ours.pos_embed.detach().clone()
    report = load_pretrained(ours, timm_files["pth"])
    assert report["dropped"]["pos_embed"] == "pos_embed kept as sincos" and report["missing"] == []
    assert torch.equal(ours.pos_embed, table)


def test_register_count_mismatch_is_reported(timm_files):
    ours = small(depth=2, img_size=64, num_register_tokens=4)
    init = ours.reg_token.detach().clone()
    state = read_state_dict(timm_files["safetensors"])
    adapted, report = adapt_state_dict(state, ours)
    assert report["missing"] == ["reg_token"] and "reg_token" not in adapted
    assert torch.count_nonzero(adapted["pos_embed"][:, 1:5]) == 0
    torch.testing.assert_close(adapted["pos_embed"][:, 0], state["pos_embed"][:, 0])
    ours.load_state_dict(adapted, strict=False)
    assert torch.equal(ours.reg_token, init)


def test_read_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        read_state_dict(tmp_path / "nothing.pth")
    (tmp_path / "w.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"w.npy: unsupported"):
        read_state_dict(tmp_path / "w.npy")
    torch.save({"epoch": 3, "args": [1, 2]}, tmp_path / "meta.pth")
    with pytest.raises(ValueError, match=r"meta.pth: no state dict.*'args', 'epoch'"):
        read_state_dict(tmp_path / "meta.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: found"):
        read_state_dict(tmp_path / "empty")
