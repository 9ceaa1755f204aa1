"""Optimizer parameter groups with lr and weight-decay scales.

Each group carries ``lr_scale`` and ``wd_scale``; the trainer sets a group's
lr to ``lr_scale x`` the scheduled lr and its weight decay to ``wd_scale x``
the scheduled weight decay every step, so a text tower at 0.1x lr or a
layer-wise decay keeps its ratio through warm-up and cosine.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn


def _no_decay_names(module: nn.Module) -> set[str]:
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        if hasattr(sub, "no_weight_decay"):
            names.update(f"{prefix}.{n}" if prefix else n for n in sub.no_weight_decay())
    return names


def is_no_decay(name: str, p: torch.Tensor, skip: set[str]) -> bool:
    """Biases, norms (1-d), tokens and position embeddings take no weight decay."""
    return p.ndim <= 1 or name in skip or name.endswith(".bias") or "token" in name.rsplit(".", 1)[-1]


def decay_groups(module: nn.Module, *, prefix: str = "", lr_scale: float = 1.0,
                 exclude: Iterable[nn.Parameter] = ()) -> list[dict[str, Any]]:
    """Two groups over the trainable parameters of ``module``: decayed and not (``wd_scale`` 0)."""
    skip, excluded = _no_decay_names(module), {id(p) for p in exclude}
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad and id(p) not in excluded:
            (no_decay if is_no_decay(name, p, skip) else decay).append(p)
    tag = f"{prefix}/" if prefix else ""
    groups = [{"params": decay, "name": f"{tag}decay", "lr_scale": lr_scale, "wd_scale": 1.0},
              {"params": no_decay, "name": f"{tag}no_decay", "lr_scale": lr_scale, "wd_scale": 0.0}]
    return [g for g in groups if g["params"]]


def layer_decay_groups(module: nn.Module, layer_of: Callable[[str], int], num_layers: int, decay: float,
                       *, prefix: str = "") -> list[dict[str, Any]]:
    """Layer-wise lr decay (BEiT / MAE fine-tuning): layer i of ``num_layers`` gets ``decay ** (num_layers - i)``.

    ``layer_of(name) -> int`` maps a parameter name to its layer (0 = embeddings,
    ``num_layers`` = the head); within a layer, decayed and not-decayed groups.
    """
    skip = _no_decay_names(module)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        layer, nd = int(layer_of(name)), is_no_decay(name, p, skip)
        g = groups.setdefault((layer, nd), {
            "params": [], "name": f"{prefix + '/' if prefix else ''}layer{layer}/{'no_decay' if nd else 'decay'}",
            "lr_scale": decay ** (num_layers - layer), "wd_scale": 0.0 if nd else 1.0})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def apply_scales(groups: list[dict[str, Any]], lr: float, weight_decay: float) -> None:
    """Set every group's lr and weight decay to its scales times the scheduled values (in place)."""
    for group in groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_scale", 1.0)
