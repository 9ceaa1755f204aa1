"""Transformer building blocks of the ViT, named like timm's so state dicts match.

Attention and patch embedding run through ``kernels`` only.
"""

import torch
import torch.nn as nn

from pretrain import kernels


class PatchEmbed(nn.Module):
    """Non-overlapping N-d patch embedding; ``proj`` holds Conv2d/Conv3d-layout parameters
    (timm's names) but the computation is ``kernels.patch_embed``."""

    def __init__(
        self, spatial_dims: int, in_chans: int, embed_dim: int, patch_size: tuple[int, ...], backend: str = "auto"
    ) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.proj = conv(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.patch_size = tuple(patch_size)
        self.backend = backend

    def forward(self, x: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, *spatial) -> tokens (B, N, D), with ``pos_embed`` (1, N, D) added when given."""
        return kernels.patch_embed(
            x, self.proj.weight, self.proj.bias, self.patch_size, pos_embed=pos_embed, backend=self.backend
        )


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "auto") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = backend

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x_BND.shape
        # (B, N, 3D) -> (3, B, heads, N, head_dim): timm's qkv output layout.
        qkv = self.qkv(x_BND).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out_BHNd = kernels.attention(q, k, v, backend=self.backend)
        return self.proj(out_BHNd.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """fc1 -> GELU (exact erf) -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """fc2(SiLU(fc1_g x) * fc1_x x), with timm's split-projection names."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1_g(x)) * self.fc1_x(x))


class LayerScale(nn.Module):
    """Per-channel learned residual scale ``gamma`` (CaiT / DINOv2)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep_B11 = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * keep_B11.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        *,
        qkv_bias: bool = True,
        mlp: str = "gelu",
        layer_scale_init: float | None = None,
        drop_path: float = 0.0,
        attn_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, backend=attn_backend)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, mlp_hidden) if mlp == "swiglu" else Mlp(dim, mlp_hidden)
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        x_BND = x_BND + self.drop_path1(self.ls1(self.attn(self.norm1(x_BND))))
        return x_BND + self.drop_path2(self.ls2(self.mlp(self.norm2(x_BND))))
