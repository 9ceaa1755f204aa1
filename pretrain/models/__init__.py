"""Backbones: one Vision Transformer for 2D and 3D inputs."""

from pretrain.models.presets import VIT_PRESETS, ViTPreset
from pretrain.models.vit import ViTConfig, VisionTransformer

__all__ = ["VIT_PRESETS", "ViTConfig", "ViTPreset", "VisionTransformer"]
