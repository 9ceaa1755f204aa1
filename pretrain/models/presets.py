"""Named ViT sizes (width / depth / heads / MLP ratio).

| preset | embed_dim | depth | heads | mlp_ratio | params (2D, patch 16, 1 channel) | origin |
| ------ | --------- | ----- | ----- | --------- | -------------------------------- | ------ |
| nano   | 64        | 4     | 2     | 4         | ~0.23 M              | CPU tests and demos |
| micro  | 128       | 6     | 4     | 4         | ~1.25 M              | CPU demos |
| tiny   | 192       | 12    | 3     | 4         | ~5.4 M               | timm / DeiT ViT-Ti |
| small  | 384       | 12    | 6     | 4         | ~21.5 M              | timm / DINOv2 ViT-S |
| base   | 768       | 12    | 12    | 4         | ~85 M                | timm / DINOv2 ViT-B |
| large  | 1024      | 24    | 16    | 4         | ~303 M               | timm / DINOv2 ViT-L |
| huge   | 1280      | 32    | 16    | 4         | ~630 M               | timm ViT-H |
| giant  | 1536      | 40    | 24    | 4         | ~1.13 B              | DINOv2 ViT-g width/depth/heads |

"giant" keeps the GELU MLP at ratio 4 like every other preset, so a preset
only ever sets the four numbers above. DINOv2's released ViT-g ("giant2")
instead uses a SwiGLU MLP of hidden width 4096; build that one without a
preset: ``embed_dim=1536, depth=40, num_heads=24, mlp="swiglu", mlp_ratio=8/3``
(int(1536 * 8/3) = 4096, about 1.1 B parameters as well).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class ViTPreset:
    """The size fields a preset fills in a ``ViTConfig``."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float


VIT_PRESETS: dict[str, ViTPreset] = {
    "nano": ViTPreset(embed_dim=64, depth=4, num_heads=2, mlp_ratio=4.0),
    "micro": ViTPreset(embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0),
    "tiny": ViTPreset(embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
    "small": ViTPreset(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "base": ViTPreset(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "large": ViTPreset(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    "huge": ViTPreset(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0),
    "giant": ViTPreset(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=4.0),
}


def get_preset(name: str) -> ViTPreset:
    """The preset called ``name``; ValueError naming ``ViTConfig.preset`` and the valid names otherwise."""
    try:
        return VIT_PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"ViTConfig.preset: unknown preset {name!r}; choose one of {', '.join(VIT_PRESETS)} or None"
        ) from None
