"""Export target timm: the hub layout ``timm.create_model("local-dir:PATH" | "hf-hub:REPO", pretrained=True)`` reads.

``config.json`` holds ``architecture`` (a name timm registers), ``num_classes: 0``,
``model_args`` (every constructor argument that makes the registered model ours)
and ``pretrained_cfg`` (input size, mean/std, ``fixed_input_size``). The weights
keep their names: our 2D ViT is named like timm's ``VisionTransformer``, and a
``timm:`` backbone is timm's own module under ``net.``.

- GELU ViTs use a ``vit_*`` name (``vit_base_patch16_224`` when no registered
  name has our width, patch and size); ``model_args`` override all that differs.
- SwiGLU ViTs: timm registers no LayerNorm ViT with the unpacked SwiGLU our
  blocks use, but ``aimv2_*`` builds timm's ``VisionTransformer`` with
  ``mlp_layer=SwiGLU``; its RMSNorms, bias-free projections, average pool and
  missing class token are overridden back to ours in ``model_args``.
- Position embeddings are not resampled by the exported model
  (``fixed_input_size``): timm's resampling and ours need not agree bit for bit.
"""
from __future__ import annotations

from typing import Any

import torch

from pretrain.models.backbones import ModelConfig, timm_model_args

NAME = "timm"
_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}
_SWIGLU_ARCH = "aimv2_large_patch14_224"
# aimv2's defaults that are not ours, set back explicitly
_SWIGLU_OVERRIDES = {"act_layer": "silu", "norm_layer": "layernorm", "embed_norm_layer": None, "fc_norm": False,
                     "proj_bias": True}


def refusal(model: ModelConfig) -> str | None:
    """Why this encoder cannot be a timm model, or None."""
    if model.name.startswith("monai:"):
        return f"{model.name} is a MONAI network; export it with --target monai"
    if model.spatial_dims != 2:
        return "timm builds 2D models only; a 3D ViT exports with --target monai"
    return None


def _vit_architecture(model: ModelConfig) -> str:
    import timm

    if model.mlp == "swiglu":
        return _SWIGLU_ARCH
    img, patch = model.img_size_tuple(), model.patch_size_tuple()
    size = _SIZES.get(model.embed_dim)
    name = f"vit_{size}_patch{patch[0]}_{img[0]}"
    square = len(set(img)) == 1 and len(set(patch)) == 1
    return name if size and square and timm.is_model(name) else "vit_base_patch16_224"


def vit_model_args(model: ModelConfig) -> dict[str, Any]:
    """timm ``VisionTransformer`` keyword arguments that build our 2D ViT (JSON-safe)."""
    args = {
        "img_size": list(model.img_size_tuple()), "patch_size": list(model.patch_size_tuple()),
        "in_chans": model.in_chans, "embed_dim": model.embed_dim, "depth": model.depth, "num_heads": model.num_heads,
        "mlp_ratio": model.mlp_ratio, "qkv_bias": model.qkv_bias, "init_values": model.layer_scale_init,
        "reg_tokens": model.num_register_tokens, "class_token": True, "no_embed_class": False,
        "global_pool": "token", "num_classes": 0, "dynamic_img_size": False,
    }
    if model.mlp == "swiglu":
        args.update(_SWIGLU_OVERRIDES)
    return args


def export(encoder: torch.nn.Module, model: ModelConfig, license: str):
    """(config.json content, weights in timm's names)."""
    state = {k: v.detach().float().contiguous() for k, v in encoder.state_dict().items()}
    spatial = list(model.img_size_tuple())
    if model.name == "vit":
        architecture, args = _vit_architecture(model), vit_model_args(model)
        first_conv, fixed = "patch_embed.proj", True
    else:
        architecture, args = model.name.partition(":")[2], {**timm_model_args(model), "num_classes": 0}
        state = {k.removeprefix("net."): v for k, v in state.items()}
        first_conv, fixed = None, False  # timm's own default_cfg of the architecture names its stem
    channels = model.in_chans
    pretrained_cfg = {
        "input_size": [channels, *spatial], "fixed_input_size": fixed, "num_classes": 0,
        # Our intensity normalisation happens before the model (see the card); timm's own transform
        # then changes nothing: mean 0, std 1, no crop, the model's size.
        "mean": [0.0] * channels, "std": [1.0] * channels, "crop_pct": 1.0, "crop_mode": "center",
        "interpolation": "bilinear", "license": license,
    }
    if first_conv:
        pretrained_cfg.update(first_conv=first_conv, classifier="head")
    config = {"architecture": architecture, "num_classes": 0, "model_args": args, "pretrained_cfg": pretrained_cfg}
    return config, state


def to_ours(weights: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Exported weights -> the state dict of our encoder."""
    return dict(weights) if model.name == "vit" else {f"net.{k}": v for k, v in weights.items()}


def load(folder: str) -> torch.nn.Module:
    """The export as timm builds it from the hub layout (the loader users run)."""
    import timm

    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


def snippet(repo: str, model: ModelConfig, config: dict[str, Any]) -> str:
    return (
        "```python\n"
        "import timm, torch\n\n"
        f'model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()  # or "local-dir:/path/to/export"\n'
        f"x = torch.randn(1, {model.in_chans}, {', '.join(map(str, model.img_size_tuple()))})"
        "  # (B, C, H, W), intensities normalised as under Input\n"
        "embedding = model(x)                # (B, D): what the kNN / linear probes of the run read\n"
        "tokens = model.forward_features(x)  # (B, tokens, D) after the final norm\n"
        "```\n"
    )
