"""Export target MONAI: our ViT as ``monai.networks.nets.ViT``, a ``monai:`` backbone as its own MONAI class.

MONAI has no hub loader, so ``config.json`` says what to build (``class``,
its exact ``args``) and what to set after construction (``after_init``); the
card's snippet does both and loads ``model.safetensors`` with ``strict=True``.

Our ViT differs from MONAI's in ways that fold exactly:

- class token: MONAI's (``classification=True``) gets no position, ours does:
  the class row of ``pos_embed`` is added into ``cls_token``;
- LayerScale: ``x + gamma * proj(h)`` = ``x + proj'(h)`` with proj' = diag(gamma)
  proj, so each gamma is multiplied into ``attn.out_proj`` and ``mlp.linear2``;
- ``qkv_bias`` is a constructor argument; MONAI's qkv output is laid out
  (qkv, heads, head_dim) like ours;
- LayerNorm eps is hard-coded 1e-5 in MONAI (ours 1e-6): ``after_init`` sets it;
- the classification head becomes ``torch.nn.Identity()``, so the output is the
  class-token embedding after the final norm, as our encoder's.

Refused, with the reason: register tokens and SwiGLU MLPs (MONAI's blocks have
neither). MONAI does not resample position embeddings: inputs keep the
exported size.
"""
from __future__ import annotations

from typing import Any

import torch

from pretrain.models.backbones import ModelConfig, monai_network

NAME = "monai"
LAYER_NORM_EPS = 1e-6
_RENAMES = ((".attn.proj.", ".attn.out_proj."), (".mlp.fc1.", ".mlp.linear1."), (".mlp.fc2.", ".mlp.linear2."))


def refusal(model: ModelConfig) -> str | None:
    """Why this encoder cannot be a MONAI network, or None."""
    if model.name.startswith("timm:"):
        return f"{model.name} is a timm network; export it with --target timm"
    if model.name != "vit":
        return None
    if model.num_register_tokens:
        return (f"model.num_register_tokens={model.num_register_tokens}: MONAI's ViT has no register tokens "
                "(they take part in every attention, so dropping them changes the features)")
    if model.mlp != "gelu":
        return f"model.mlp={model.mlp!r}: MONAI's ViT blocks have a GELU MLP only"
    return None


def vit_args(model: ModelConfig) -> dict[str, Any]:
    """``monai.networks.nets.ViT`` keyword arguments of our ViT (JSON-safe)."""
    return {
        "in_channels": model.in_chans, "img_size": list(model.img_size_tuple()),
        "patch_size": list(model.patch_size_tuple()), "hidden_size": model.embed_dim,
        "mlp_dim": int(model.embed_dim * model.mlp_ratio), "num_layers": model.depth, "num_heads": model.num_heads,
        "proj_type": "conv", "pos_embed_type": "learnable", "classification": True,
        "post_activation": None, "dropout_rate": 0.0, "spatial_dims": model.spatial_dims, "qkv_bias": model.qkv_bias,
    }


def _vit_weights(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Our ViT's state dict in MONAI's names, with the class position and LayerScale folded in."""
    out = {
        "cls_token": state["cls_token"] + state["pos_embed"][:, :1],
        "patch_embedding.position_embeddings": state["pos_embed"][:, 1:],
        "patch_embedding.patch_embeddings.weight": state["patch_embed.proj.weight"],
        "patch_embedding.patch_embeddings.bias": state["patch_embed.proj.bias"],
        "norm.weight": state["norm.weight"], "norm.bias": state["norm.bias"],
    }
    for i in range(model.depth):
        block = f"blocks.{i}."
        for key, value in state.items():
            if not key.startswith(block) or key.endswith(".gamma"):
                continue
            name = key
            for ours, theirs in _RENAMES:
                name = name.replace(ours, theirs)
            out[name] = value
        for ls, proj in (("ls1", "attn.out_proj"), ("ls2", "mlp.linear2")):
            gamma = state.get(f"{block}{ls}.gamma")
            if gamma is not None:
                out[f"{block}{proj}.weight"] = gamma[:, None] * out[f"{block}{proj}.weight"]
                out[f"{block}{proj}.bias"] = gamma * out[f"{block}{proj}.bias"]
        # MONAI builds a cross-attention norm in every block, used only with cross-attention: identity weights
        out[f"{block}norm_cross_attn.weight"] = torch.ones(model.embed_dim)
        out[f"{block}norm_cross_attn.bias"] = torch.zeros(model.embed_dim)
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def export(encoder: torch.nn.Module, model: ModelConfig, license: str):
    """(config.json content, weights in MONAI's names)."""
    state = encoder.state_dict()
    if model.name == "vit":
        config = {"library": "monai", "class": "monai.networks.nets.ViT", "args": vit_args(model),
                  "after_init": {"classification_head": "torch.nn.Identity()", "layer_norm_eps": LAYER_NORM_EPS},
                  "embedding": "net(x)[0]", "pool_spatial": False, "unetr": unetr_fit(model)}
        return config, _vit_weights(state, model)
    network = monai_network(model)
    config = {"library": "monai", "class": network.qualname, "args": network.args, "after_init": {},
              "embedding": network.call, "pool_spatial": not network.pooled}
    return config, {k.removeprefix("net."): v.detach().float().contiguous() for k, v in state.items()}


def to_ours(weights: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Exported weights -> the state dict of our encoder (LayerScale, if any, comes back as gamma = 1)."""
    if model.name != "vit":
        return {f"net.{k}": v for k, v in weights.items()}
    out = {"cls_token": weights["cls_token"], "norm.weight": weights["norm.weight"], "norm.bias": weights["norm.bias"],
           "patch_embed.proj.weight": weights["patch_embedding.patch_embeddings.weight"],
           "patch_embed.proj.bias": weights["patch_embedding.patch_embeddings.bias"]}
    pos = weights["patch_embedding.position_embeddings"]
    out["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    for key, value in weights.items():
        if key.startswith("blocks.") and ".norm_cross_attn." not in key:
            for ours, theirs in _RENAMES:
                key = key.replace(theirs, ours)
            out[key] = value
    if model.layer_scale_init:
        for i in range(model.depth):
            out[f"blocks.{i}.ls1.gamma"] = out[f"blocks.{i}.ls2.gamma"] = torch.ones(model.embed_dim)
    return out


def unetr_fit(model: ModelConfig) -> dict[str, Any]:
    """Whether the encoder can be ``monai.networks.nets.UNETR``'s ``vit`` and why not."""
    reasons = []
    if model.depth != 12:
        reasons.append(f"UNETR hard-codes 12 layers, the encoder has {model.depth}")
    if set(model.patch_size_tuple()) != {16}:
        reasons.append(f"UNETR hard-codes patch 16, the encoder has {list(model.patch_size_tuple())}")
    if model.spatial_dims != 3:
        reasons.append("UNETR here is the 3D segmentation network")
    return {"fits": not reasons, "reasons": reasons}


def build(config: dict[str, Any]) -> torch.nn.Module:
    """The network ``config.json`` describes, built as the card's snippet does."""
    import importlib

    module, _, name = config["class"].rpartition(".")
    net = getattr(importlib.import_module(module), name)(**config["args"])
    if "classification_head" in config["after_init"]:
        net.classification_head = torch.nn.Identity()
    if "layer_norm_eps" in config["after_init"]:
        for layer in net.modules():
            if isinstance(layer, torch.nn.LayerNorm):
                layer.eps = config["after_init"]["layer_norm_eps"]
    return net


# The calls config.json may name (never evaluated as code: a downloaded config is not trusted).
CALLS = {"net(x)": lambda net, x: net(x), "net(x)[0]": lambda net, x: net(x)[0],
         "net(x, normalize=True)[-1]": lambda net, x: net(x, normalize=True)[-1]}


def embedding(net: torch.nn.Module, x: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """The embedding as the card computes it: ``config["embedding"]``, then the spatial mean if it is a map."""
    if config["embedding"] not in CALLS:
        raise ValueError(f"config.json: embedding {config['embedding']!r} is not one of {', '.join(CALLS)}")
    out = CALLS[config["embedding"]](net, x)
    return out.flatten(2).mean(dim=2) if config["pool_spatial"] else out


def load(folder: str):
    """The export as MONAI users load it (strict): a function from input to embedding."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    config = json.loads((Path(folder) / "config.json").read_text())
    net = build(config)
    net.load_state_dict(load_file(str(Path(folder) / "model.safetensors")), strict=True)
    net.eval()
    return lambda x: embedding(net, x, config)


def snippet(repo: str, model: ModelConfig, config: dict[str, Any]) -> str:
    module, _, name = config["class"].rpartition(".")
    args = ",\n    ".join(f"{k}={v!r}" for k, v in config["args"].items())
    lines = ["```python", "import torch", "from huggingface_hub import snapshot_download",
             "from safetensors.torch import load_file", f"from {module} import {name}", "",
             f'folder = snapshot_download("{repo}")  # or the export folder itself',
             f"net = {name}(\n    {args},\n)"]
    if "classification_head" in config["after_init"]:
        lines.append("net.classification_head = torch.nn.Identity()  # the class-token embedding is the output")
    if "layer_norm_eps" in config["after_init"]:
        lines += ["for layer in net.modules():  # MONAI hard-codes eps=1e-5; the encoder was trained with 1e-6",
                  "    if isinstance(layer, torch.nn.LayerNorm):", f"        layer.eps = {LAYER_NORM_EPS}"]
    lines += ['net.load_state_dict(load_file(f"{folder}/model.safetensors"), strict=True)', "net.eval()",
              f"x = torch.randn(1, {model.in_chans}, {', '.join(map(str, model.img_size_tuple()))})",
              f"embedding = {config['embedding']}" + (".flatten(2).mean(dim=2)  # the mean over the feature map"
                                                        if config["pool_spatial"] else "  # (B, D)"), "```"]
    text = "\n".join(lines) + "\n"
    fit = config.get("unetr")
    if fit and fit["fits"]:
        text += ("\nAs the encoder of `monai.networks.nets.UNETR(..., hidden_size="
                 f"{model.embed_dim}, mlp_dim={config['args']['mlp_dim']}, num_heads={model.num_heads}, "
                 f"qkv_bias={model.qkv_bias})`: UNETR's ViT has no class token, so drop `cls_token` and "
                 "`classification_head` from the weights, set the LayerNorm eps as above and load into `unetr.vit` "
                 "with `strict=True`; its patch tokens then differ from ours by the missing class token, "
                 "which fine-tuning absorbs.\n")
    elif fit:
        text += "\nNot a drop-in `UNETR` encoder: " + "; ".join(fit["reasons"]) + ".\n"
    return text
