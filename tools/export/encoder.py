"""Export a trained encoder: one fp32 safetensors file, its config and a model card.

The weights are consolidated from the DeepSpeed checkpoint (ZeRO 0-3, any
precision) into fp32, loaded into a freshly built objective (so a mismatch is
an error here, not in the user's hands), and the headline encoder of the
objective's ``eval_bundle()`` is written. 2D ViTs keep timm's parameter names.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pretrain.config import config_to_dict, load_config
from pretrain.storage.checkpoints import COMPLETE, fp32_state_dict, resolve_checkpoint
from pretrain.models.backbones import ModelConfig, build_backbone
from pretrain.objectives import build_objective

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def trained_objective(ckpt: Path):
    """(objective with the checkpoint's fp32 weights, its RunConfig)."""
    cfg = load_config(ckpt / "config.yaml")
    if getattr(cfg.objective, "init_from", ""):
        # The checkpoint holds every weight: the run's starting weights need not exist here any more.
        cfg.objective.init_from = ""
    objective = build_objective(cfg)
    missing, unexpected = objective.load_state_dict(fp32_state_dict(ckpt), strict=False)
    # What DeepSpeed does not hold in fp32 (an EMA teacher) comes from the per-rank states.
    rank_states = [torch.load(f, map_location="cpu", weights_only=False).get("objective", {})
                   for f in sorted(ckpt.glob("rank*_state.pt"))]
    restored = objective.restore_from_rank_states(rank_states)
    missing = [k for k in missing if k not in restored]
    if missing or unexpected:
        raise RuntimeError(f"{ckpt}: checkpoint does not match the objective: missing {missing}, unexpected {unexpected}")
    return objective, cfg


def load_encoder(source: str | Path) -> tuple[torch.nn.Module, str, str]:
    """(encoder, intensity normalisation, pooling its objective reads it with) from an export folder,
    a run directory or a checkpoint."""
    source = Path(source)
    if (source / CONFIG).is_file():
        meta = json.loads((source / CONFIG).read_text())
        return (load_exported_encoder(source), meta.get("preprocessing", {}).get("intensity", "zscore"),
                meta.get("pool", "cls"))
    objective, cfg = trained_objective(resolve_checkpoint(source))
    bundle = objective.eval_bundle()
    return bundle.headline[1], cfg.data.intensity, bundle.pool


def export_encoder(source: str | Path, out: str | Path) -> Path:
    """Write ``model.safetensors``, ``config.json`` and ``README.md`` for the encoder; returns ``out``."""
    ckpt = resolve_checkpoint(source)
    objective, cfg = trained_objective(ckpt)
    bundle = objective.eval_bundle()
    name, encoder = bundle.headline
    encoder_state = {k: v.detach().float().contiguous() for k, v in encoder.state_dict().items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    step = int((ckpt / COMPLETE).read_text().strip() or 0)
    save_file(encoder_state, str(out / WEIGHTS), metadata={"format": "pt", "step": str(step)})
    meta = {
        "architecture": f"medpretrain.{cfg.model.name}",
        "model": config_to_dict(cfg.model),
        "objective": cfg.objective.name,
        "encoder": name,
        "pool": bundle.pool,
        "preprocessing": {"intensity": cfg.data.intensity, "layout": "channels-first, native dtype -> float32"},
        "step": step,
        "source_checkpoint": str(ckpt.resolve()),
        "num_parameters": sum(v.numel() for v in encoder_state.values()),
    }
    if cfg.model.spatial_dims == 2 and cfg.model.name == "vit":
        meta["timm_kwargs"] = timm_kwargs(meta["model"])
    (out / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(_model_card(meta))
    log.info("exported %s -> %s", ckpt, out)
    return out


def load_exported_encoder(folder: str | Path) -> torch.nn.Module:
    """Rebuild the encoder from an export folder (strict: every key must match)."""
    folder = Path(folder)
    meta = json.loads((folder / CONFIG).read_text())
    from pretrain.config.typed import build

    encoder = build_backbone(build(ModelConfig, meta["model"], "model"))
    encoder.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    return encoder


def timm_kwargs(model: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of timm's ``VisionTransformer`` that build this 2D encoder (JSON-safe)."""
    if model["spatial_dims"] != 2:
        raise ValueError("timm builds 2D ViTs only; 3D encoders export for MONAI")
    return {
        "img_size": model["img_size"], "patch_size": model["patch_size"], "in_chans": model["in_chans"],
        "embed_dim": model["embed_dim"], "depth": model["depth"], "num_heads": model["num_heads"],
        "mlp_ratio": model["mlp_ratio"], "qkv_bias": model["qkv_bias"], "reg_tokens": model["num_register_tokens"],
        "init_values": model["layer_scale_init"], "num_classes": 0, "global_pool": "token", "class_token": True,
    }


def load_into_timm(folder: str | Path):
    """A timm ``VisionTransformer`` holding the exported 2D weights (``strict=True``)."""
    from timm.layers import SwiGLU
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    folder = Path(folder)
    meta = json.loads((folder / CONFIG).read_text())
    kwargs = dict(meta["timm_kwargs"])
    if meta["model"]["mlp"] == "swiglu":
        kwargs.update(mlp_layer=SwiGLU, act_layer=torch.nn.SiLU)
    model = TimmViT(**kwargs)
    model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    return model


def _model_card(meta: dict[str, Any]) -> str:
    m = meta["model"]
    dims = "3D" if m["spatial_dims"] == 3 else "2D"
    if m["name"] != "vit":
        return (f"# medpretrain {dims} `{m['name']}` encoder\n\n"
                f"Pretrained with `{meta['objective']}` for {meta['step']} steps by medpretrain.\n\n"
                f"- input: {m['in_chans']} channel(s), {dims}, image size {m['img_size']}\n"
                f"- parameters {meta['num_parameters']:,}; weights: `{WEIGHTS}` (fp32); full config: `{CONFIG}`\n")
    return (
        f"# medpretrain {dims} ViT encoder\n\n"
        f"Pretrained with `{meta['objective']}` for {meta['step']} steps by medpretrain.\n\n"
        f"- input: {m['in_chans']} channel(s), {dims}, image size {m['img_size']}, patch {m['patch_size']}\n"
        f"- width {m['embed_dim']}, depth {m['depth']}, heads {m['num_heads']}, parameters {meta['num_parameters']:,}\n"
        f"- weights: `{WEIGHTS}` (fp32); full config: `{CONFIG}`\n"
    )
