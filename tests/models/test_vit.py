"""VisionTransformer: shapes, timm compatibility, position embeddings, masking, checkpointing, FLOPs, config errors."""

import math

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import SwiGLU as TimmSwiGLU
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch.utils.flop_counter import FlopCounterMode

from pretrain.models import ViTConfig, VisionTransformer
from pretrain.models.pos_embed import resample_pos_embed, sincos_pos_embed


def tiny(**overrides) -> ViTConfig:
    """A 2D nano ViT on 32x32 single-channel images with 8x8 patches (16 patches)."""
    fields = dict(preset="nano", img_size=32, patch_size=8, in_chans=1)
    fields.update(overrides)
    return ViTConfig(**fields)


def seeded_model(cfg: ViTConfig, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(cfg)


# ------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "overrides,x_shape,tokens",
    [
        (dict(), (2, 1, 32, 32), 1 + 16),
        (dict(in_chans=3), (2, 3, 32, 32), 1 + 16),
        (dict(spatial_dims=3, img_size=16, patch_size=8), (2, 1, 16, 16, 16), 1 + 8),
        (dict(spatial_dims=3, img_size=[8, 16, 16], patch_size=[4, 8, 8], in_chans=3), (2, 3, 8, 16, 16), 1 + 8),
        (dict(num_register_tokens=4), (2, 1, 32, 32), 1 + 4 + 16),
    ],
)
def test_output_shapes(overrides, x_shape, tokens):
    model = seeded_model(tiny(**overrides))
    x = torch.randn(x_shape)
    assert model.forward_features(x).shape == (2, tokens, 64)
    assert model(x).shape == (2, 64)
    assert model.num_prefix_tokens + model.num_patches(x_shape[2:]) == tokens


def test_registers_swiglu_layer_scale_and_pooling():
    model = seeded_model(tiny(num_register_tokens=2, mlp="swiglu", layer_scale_init=1e-5))
    names = dict(model.named_parameters())
    assert names["reg_token"].shape == (1, 2, 64) and names["pos_embed"].shape == (1, 1 + 2 + 16, 64)
    assert {"blocks.0.mlp.fc1_g.weight", "blocks.0.mlp.fc1_x.weight", "blocks.0.mlp.fc2.weight"} <= set(names)
    torch.testing.assert_close(names["blocks.3.ls2.gamma"], torch.full((64,), 1e-5))
    assert model.no_weight_decay() == {"pos_embed", "cls_token", "reg_token"}
    x_BTD = model.forward_features(torch.randn(2, 1, 32, 32))
    mean_BD = x_BTD[:, 3:].mean(1)  # registers are not patches
    torch.testing.assert_close(model.pool(x_BTD, "mean"), mean_BD)
    torch.testing.assert_close(model.pool(x_BTD, "cls+mean"), torch.cat([x_BTD[:, 0], mean_BD], -1))
    with pytest.raises(ValueError, match="mode 'max'"):
        model.pool(x_BTD, "max")


# --------------------------------------------------------------- timm compat


def test_state_dict_round_trips_with_timm_vit_small():
    ours = seeded_model(ViTConfig(preset="small", in_chans=3, img_size=224, patch_size=16)).eval()
    theirs = timm.create_model("vit_small_patch16_224", num_classes=0, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=1e-5)

    torch.manual_seed(1)
    theirs = timm.create_model("vit_small_patch16_224", num_classes=0, pretrained=False).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


def test_registers_swiglu_layer_scale_load_into_timm():
    cfg = tiny(preset=None, embed_dim=64, depth=2, num_heads=2, num_register_tokens=2, mlp="swiglu",
               mlp_ratio=8 / 3, layer_scale_init=0.1)
    ours = seeded_model(cfg).eval()
    theirs = TimmViT(
        img_size=32, patch_size=8, in_chans=1, embed_dim=64, depth=2, num_heads=2, mlp_ratio=8 / 3,
        qkv_bias=True, init_values=0.1, reg_tokens=2, mlp_layer=TimmSwiGLU, act_layer=nn.SiLU, num_classes=0,
    ).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs.forward_features(x), ours.forward_features(x), rtol=0, atol=1e-5)


# ------------------------------------------------------- position embeddings


def test_learned_pos_embed_interpolates_without_touching_the_native_table():
    model = seeded_model(tiny()).eval()
    native = model.pos_embed.detach().clone()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        before = model(x)
        assert model.forward_features(torch.randn(1, 1, 48, 40)).shape == (1, 1 + 6 * 5, 64)
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    torch.testing.assert_close(model.pos_embed, native, rtol=0, atol=0)
    # Same table as timm's independent resampler (bicubic, antialias), so exports behave alike.
    expected = resample_abs_pos_embed(native, new_size=(6, 5), old_size=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(model.patch_pos_embed((6, 5)), expected[:, 1:], rtol=1e-5, atol=1e-6)


def test_resample_pos_embed_3d_keeps_prefix_and_constant_fields():
    pos = torch.cat([torch.randn(1, 2, 8), torch.full((1, 2 * 3 * 4, 8), 0.7)], dim=1)
    resized = resample_pos_embed(pos, (2, 3, 4), (3, 5, 2), num_prefix=2)
    assert resized.shape == (1, 2 + 30, 8)
    torch.testing.assert_close(resized[:, :2], pos[:, :2], rtol=0, atol=0)
    torch.testing.assert_close(resized[:, 2:], torch.full((1, 30, 8), 0.7))
    assert resample_pos_embed(pos, (2, 3, 4), (2, 3, 4), num_prefix=2) is pos
    with pytest.raises(ValueError, match=r"must be \(B, 26, D\)"):
        resample_pos_embed(pos[:, 1:], (2, 3, 4), (3, 3, 3), num_prefix=2)


def test_sincos_3d_layout_matches_the_formula():
    dim, grid = 20, (2, 3, 4)  # 20 // 6 = 3 frequencies per axis, 2 channels left over
    table = sincos_pos_embed(grid, dim)
    assert table.shape == (24, dim)
    for d, h, w in [(0, 0, 0), (1, 2, 3), (1, 0, 2)]:
        row = table[(d * 3 + h) * 4 + w]
        expected = []
        for coord in (d, h, w):
            omegas = [10000 ** (-j / 3) for j in range(3)]
            expected += [math.sin(coord * o) for o in omegas] + [math.cos(coord * o) for o in omegas]
        torch.testing.assert_close(row, torch.tensor(expected + [0.0, 0.0]))


def test_sincos_model_is_fixed_and_recomputed_exactly_for_other_grids():
    model = seeded_model(tiny(spatial_dims=3, img_size=16, patch_size=8, pos_embed="sincos"))
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0, 0], torch.zeros(64), rtol=0, atol=0)
    native = model.patch_pos_embed((2, 2, 2))[0]
    # A 6-cell axis stretched over a 2-cell one puts new cells 1 and 4 on old cells 0 and 1.
    resized = model.patch_pos_embed((6, 6, 6))[0]
    for new, old in [((1, 1, 1), (0, 0, 0)), ((4, 1, 4), (1, 0, 1))]:
        new_row, old_row = (new[0] * 6 + new[1]) * 6 + new[2], (old[0] * 2 + old[1]) * 2 + old[2]
        torch.testing.assert_close(resized[new_row], native[old_row])
    assert model.forward_features(torch.randn(1, 1, 48, 48, 48)).shape == (1, 1 + 216, 64)


# ------------------------------------------------------------ masking / MAE


def test_keep_idx_gathers_patch_tokens_after_position():
    model = seeded_model(tiny()).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        full = model.forward_features(x)
        # Attention is permutation-equivariant: keeping every patch in a shuffled order permutes the output.
        perm = torch.stack([torch.randperm(16), torch.randperm(16)])
        shuffled = model.forward_features(x, keep_idx=perm)
        torch.testing.assert_close(shuffled[:, 0], full[:, 0], rtol=1e-5, atol=1e-5)
        permuted = full[:, 1:].gather(1, perm[..., None].expand(-1, -1, 64))
        torch.testing.assert_close(shuffled[:, 1:], permuted, rtol=1e-5, atol=1e-5)
        # A subset: compare against assembling the sequence by hand.
        keep = torch.tensor([[0, 5, 9], [15, 2, 3]])
        tokens = model.patch_embed(x) + model.pos_embed[:, 1:]
        kept = tokens.gather(1, keep[..., None].expand(-1, -1, 64))
        seq = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1), kept], 1)
        for block in model.blocks:
            seq = block(seq)
        torch.testing.assert_close(model.forward_features(x, keep_idx=keep), model.norm(seq))
    assert model.forward_flops(num_tokens_kept=3) < model.forward_flops()


def test_mask_token_replaces_patches_before_position_embedding():
    model = seeded_model(tiny()).eval()
    with torch.no_grad():
        model.patch_embed.proj.bias.zero_()
    x = torch.randn(2, 1, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 5]] = True  # patch 0 = rows 0-7 x cols 0-7, patch 5 = rows 8-15 x cols 8-15
    mask[1, 15] = True
    x_zeroed = x.clone()
    x_zeroed[0, :, 0:8, 0:8] = 0
    x_zeroed[0, :, 8:16, 8:16] = 0
    x_zeroed[1, :, 24:32, 24:32] = 0
    with torch.no_grad():
        masked = model.forward_features(x, mask=mask, mask_token=torch.zeros(64))
        torch.testing.assert_close(masked, model.forward_features(x_zeroed), rtol=1e-5, atol=1e-5)
        none_masked = model.forward_features(x, mask=torch.zeros_like(mask), mask_token=torch.ones(64))
        torch.testing.assert_close(none_masked, model.forward_features(x))
    with pytest.raises(ValueError, match=r"needs mask_token of shape \(64,\)"):
        model.forward_features(x, mask=mask)
    with pytest.raises(ValueError, match=r"mask must be bool \(B, N\) = \(2, 16\)"):
        model.forward_features(x, mask=mask[:, :8], mask_token=torch.zeros(64))


# --------------------------------------------------- training-time features


def test_activation_checkpointing_gives_identical_outputs_and_grads():
    plain = seeded_model(tiny(drop_path_rate=0.3)).train()
    ckpt = seeded_model(tiny(drop_path_rate=0.3, act_checkpoint=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(4, 1, 32, 32)
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(7)  # same drop-path draws; checkpoint must replay them on recompute
        out = model.forward_features(x)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_drop_path_only_acts_in_training():
    model = seeded_model(tiny(drop_path_rate=0.5))
    assert isinstance(model.blocks[0].drop_path1, nn.Identity)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.5)
    assert model.blocks[1].drop_path2.drop_prob == pytest.approx(0.5 / 3)
    x = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
        eval_out = model(x)
        model.train()
        assert not torch.allclose(model(x), eval_out)
        no_drop = seeded_model(tiny()).train()
        no_drop.load_state_dict(model.state_dict())
        torch.testing.assert_close(no_drop(x), eval_out)


# ---------------------------------------------------------------------- flops


def test_flops_match_hand_formula_and_flop_counter():
    model = seeded_model(ViTConfig(img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=1, num_heads=2))
    # N=4 patches, T=5 tokens, D=8, MLP hidden 32, patch vector 16.
    patch = 2 * 4 * 16 * 8
    qkv, scores, attn_v, proj = 2 * 5 * 8 * 24, 2 * 5 * 5 * 8, 2 * 5 * 5 * 8, 2 * 5 * 8 * 8
    mlp = 2 * 5 * 8 * 32 * 2
    assert model.forward_flops() == patch + qkv + scores + attn_v + proj + mlp == 9504
    cases = [(tiny(), None), (tiny(mlp="swiglu", num_register_tokens=2), 5), (tiny(spatial_dims=3, img_size=16), 3)]
    for cfg, kept in cases:
        model = seeded_model(cfg)
        x = torch.randn((2, 1) + cfg.img_size_tuple())
        keep_idx = None if kept is None else torch.arange(kept).expand(2, -1)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.forward_features(x, keep_idx=keep_idx)
        # The counter sees the linear layers but not CPU SDPA; add the two attention matmuls by hand.
        tokens = model.num_prefix_tokens + (model.num_patches() if kept is None else kept)
        attention_matmuls = cfg.depth * 2 * (2 * tokens * tokens * cfg.embed_dim)
        assert counter.get_total_flops() + 2 * attention_matmuls == 2 * model.forward_flops(num_tokens_kept=kept)


# --------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(preset="colossal"), "ViTConfig.preset: unknown preset 'colossal'"),
        (dict(embed_dim=100, num_heads=3), "ViTConfig.embed_dim: 100 is not divisible by ViTConfig.num_heads 3"),
        (dict(img_size=30, patch_size=16), r"ViTConfig.img_size: \(30, 30\) is not divisible"),
        (dict(spatial_dims=4), "ViTConfig.spatial_dims: must be 2 or 3"),
        (dict(img_size=[224, 224, 224]), "ViTConfig.img_size: .* has 3 entries but spatial_dims is 2"),
        (dict(spatial_dims=3, patch_size=[16, 16]), "ViTConfig.patch_size: .* has 2 entries but spatial_dims is 3"),
        (dict(preset="small", depth=6), r"ViTConfig.depth: 6 conflicts with preset 'small' \(depth=12\)"),
        (dict(mlp="relu"), "ViTConfig.mlp: must be 'gelu' or 'swiglu'"),
        (dict(pos_embed="rope"), "ViTConfig.pos_embed"),
        (dict(drop_path_rate=1.0), "ViTConfig.drop_path_rate"),
        (dict(layer_scale_init=0.0), "ViTConfig.layer_scale_init"),
    ],
)
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        ViTConfig(**fields)


def test_presets_fill_sizes_and_models_build_on_meta():
    cfg = ViTConfig(preset="large", spatial_dims=3, img_size=96)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio) == (1024, 24, 16, 4.0)
    assert cfg.validate() is cfg  # idempotent: the filled sizes no longer conflict
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    assert model.pos_embed.shape == (1, 1 + 6**3, 1024)


def test_bad_inputs_name_the_shapes():
    model = seeded_model(tiny())
    with pytest.raises(ValueError, match=r"input must be \(B, C, H, W\) with C=1, got \(1, 3, 32, 32\)"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"spatial shape \(30, 32\) must have 2 sizes, each divisible by patch_size"):
        model(torch.randn(1, 1, 30, 32))
