"""One Vision Transformer for 2D images and 3D volumes.

Parameter names follow timm's ``VisionTransformer`` (cls_token, reg_token,
pos_embed, patch_embed.proj, blocks.{i}.norm1/attn.qkv/attn.proj/ls1.gamma/
norm2/mlp.fc1/mlp.fc2/ls2.gamma, norm), so a 2D state dict loads into timm with
``strict=True``: ``timm.create_model("vit_small_patch16_224", num_classes=0)``
for the matching config, and in general timm's ``VisionTransformer(img_size,
patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
init_values=layer_scale_init, reg_tokens=R, num_classes=0)`` plus
``mlp_layer=SwiGLU, act_layer=nn.SiLU`` for ``mlp="swiglu"``.

Position-embedding rule (timm's default, ``no_embed_class=False``): ``pos_embed``
is (1, 1 + R + N, D) and covers the class token, the R register tokens (which
come right after the class token) and the N patches; prefix tokens and patches
all get their position added. A sin-cos table stores zeros for the prefix rows.
(timm's DINOv2-with-registers models use ``no_embed_class=True`` instead; an
exporter targeting that layout adds the prefix rows of ``pos_embed`` into
``cls_token``/``reg_token`` and keeps the N patch rows.)
3D models use the same names with Conv3d-layout patch weights.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint

from pretrain.models.blocks import Block, LayerScale, PatchEmbed
from pretrain.models.encoder import pool_tokens
from pretrain.models.pos_embed import resample_pos_embed, sincos_pos_embed
from pretrain.models.presets import VIT_PRESETS, get_preset

def _axis_tuple(value: int | list[int] | tuple[int, ...], spatial_dims: int, field: str) -> tuple[int, ...]:
    """An int or a per-axis sequence as a ``spatial_dims``-tuple of positive ints; errors name ``field``."""
    if isinstance(value, int):
        values = (value,) * spatial_dims
    elif isinstance(value, (list, tuple)):
        values = tuple(value)
    else:
        raise ValueError(f"ViTConfig.{field}: {value!r} must be a positive int or a list of positive ints")
    if len(values) != spatial_dims:
        raise ValueError(f"ViTConfig.{field}: {value!r} has {len(values)} entries but spatial_dims is {spatial_dims}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"ViTConfig.{field}: {value!r} must be a positive int or a list of positive ints")
    return values


@dataclass
class ViTConfig:
    """Architecture of a ``VisionTransformer``; validated (and the preset applied) on construction.

    ``preset`` fills embed_dim/depth/num_heads/mlp_ratio from ``presets.VIT_PRESETS``;
    any of those four given with a value other than its default and the preset's
    is a conflict error. For ``mlp="swiglu"`` the hidden width is
    int(embed_dim * mlp_ratio) for each of fc1_g and fc1_x (as in timm), so
    mlp_ratio = 2/3 of the GELU ratio keeps the parameter count.
    """

    preset: str | None = None  # named size (nano ... giant) setting embed_dim/depth/num_heads/mlp_ratio
    spatial_dims: int = 2  # 2: images (B, C, H, W); 3: volumes (B, C, D, H, W)
    img_size: int | list[int] = 224  # native input size in pixels/voxels, one for all axes or one per axis
    patch_size: int | list[int] = 16  # patch size in pixels/voxels, one or one per axis; must divide img_size
    in_chans: int = 1  # input channels; 1-channel data are repeated to match, N-channel data averaged for 1
    embed_dim: int = 768  # token width D, a multiple of num_heads (set by preset)
    depth: int = 12  # transformer blocks (set by preset)
    num_heads: int = 12  # attention heads per block (set by preset)
    mlp_ratio: float = 4.0  # MLP hidden width as a multiple of embed_dim (set by preset)
    qkv_bias: bool = True  # bias in the attention's q/k/v projection
    mlp: str = "gelu"  # "gelu" | "swiglu"
    pos_embed: str = "learned"  # "learned" | "sincos" (fixed, requires_grad False)
    num_register_tokens: int = 0  # learned register tokens after the class token (DINOv2 registers); 0: none
    layer_scale_init: float | None = None  # initial LayerScale gamma of each residual branch; None: no LayerScale
    drop_path_rate: float = 0.0  # stochastic depth of the last block, rising linearly from 0; in [0, 1)
    act_checkpoint: bool = False  # torch.utils.checkpoint per block, use_reentrant=False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "ViTConfig":
        """Apply the preset and check every field; ValueError naming the field. Idempotent."""
        if self.preset is not None:
            self._apply_preset()
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"ViTConfig.spatial_dims: must be 2 or 3, got {self.spatial_dims!r}")
        img, patch = self.img_size_tuple(), self.patch_size_tuple()
        if any(i % p for i, p in zip(img, patch)):
            raise ValueError(f"ViTConfig.img_size: {img} is not divisible by ViTConfig.patch_size {patch}")
        for name in ("in_chans", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ViTConfig.{name}: must be a positive int, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"ViTConfig.embed_dim: {self.embed_dim} is not divisible by ViTConfig.num_heads {self.num_heads}"
            )
        if not self.mlp_ratio > 0:
            raise ValueError(f"ViTConfig.mlp_ratio: must be > 0, got {self.mlp_ratio!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"ViTConfig.mlp: must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.pos_embed not in ("learned", "sincos"):
            raise ValueError(f"ViTConfig.pos_embed: must be 'learned' or 'sincos', got {self.pos_embed!r}")
        if not isinstance(self.num_register_tokens, int) or self.num_register_tokens < 0:
            raise ValueError(f"ViTConfig.num_register_tokens: must be an int >= 0, got {self.num_register_tokens!r}")
        if self.layer_scale_init is not None and not self.layer_scale_init > 0:
            raise ValueError(f"ViTConfig.layer_scale_init: must be None or > 0, got {self.layer_scale_init!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"ViTConfig.drop_path_rate: must be in [0, 1), got {self.drop_path_rate!r}")
        return self

    def _apply_preset(self) -> None:
        spec = get_preset(self.preset)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in ("embed_dim", "depth", "num_heads", "mlp_ratio"):
            given, wanted = getattr(self, name), getattr(spec, name)
            if given != defaults[name] and given != wanted:
                raise ValueError(
                    f"ViTConfig.{name}: {given!r} conflicts with preset {self.preset!r} ({name}={wanted!r}); "
                    f"drop {name} or set preset to None. Presets: {', '.join(VIT_PRESETS)}"
                )
            setattr(self, name, wanted)

    def img_size_tuple(self) -> tuple[int, ...]:
        return _axis_tuple(self.img_size, self.spatial_dims, "img_size")

    def patch_size_tuple(self) -> tuple[int, ...]:
        return _axis_tuple(self.patch_size, self.spatial_dims, "patch_size")


class VisionTransformer(nn.Module):
    """ViT encoder for (B, C, H, W) images or (B, C, D, H, W) volumes of any size divisible by the patch.

    Initialisation follows timm: linear weights trunc_normal(std=0.02) with zero
    biases (SwiGLU's gate included, no near-zero gate trick), LayerNorm ones/zeros,
    the patch projection with PyTorch's Conv default, learned pos_embed
    trunc_normal(0.02), cls/register tokens normal(std=1e-6), LayerScale gamma =
    layer_scale_init. Stochastic depth rises linearly from 0 to drop_path_rate.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self._patch_size = cfg.patch_size_tuple()
        self.native_grid = tuple(s // p for s, p in zip(cfg.img_size_tuple(), self._patch_size))
        dim = cfg.embed_dim

        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if cfg.num_register_tokens:
            self.reg_token = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, dim))
        else:
            self.register_parameter("reg_token", None)
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.num_prefix_tokens + math.prod(self.native_grid), dim),
            requires_grad=cfg.pos_embed == "learned",
        )
        self.patch_embed = PatchEmbed(cfg.spatial_dims, cfg.in_chans, dim, self._patch_size)
        # Python arithmetic, not torch.linspace, so the model can be built on the meta device.
        drop_rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(
                dim,
                cfg.num_heads,
                int(dim * cfg.mlp_ratio),
                qkv_bias=cfg.qkv_bias,
                mlp=cfg.mlp,
                layer_scale_init=cfg.layer_scale_init,
                drop_path=rate,
            )
            for rate in drop_rates
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.init_weights()

    # ------------------------------------------------------------------ shape facts

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def spatial_dims(self) -> int:
        return self.cfg.spatial_dims

    @property
    def in_chans(self) -> int:
        return self.cfg.in_chans

    #: forward_features takes ``mask``/``mask_token`` (iBOT) and ``keep_idx`` (MAE)
    supports_token_mask = True

    @property
    def num_prefix_tokens(self) -> int:
        """Class token plus register tokens, in front of the patch tokens."""
        return 1 + self.cfg.num_register_tokens

    @property
    def patch_size(self) -> tuple[int, ...]:
        return self._patch_size

    def grid_size(self, spatial_shape: tuple[int, ...] | list[int] | torch.Size | None = None) -> tuple[int, ...]:
        """Patch grid of an input with ``spatial_shape`` (default: the configured img_size)."""
        # List comprehensions, not generators: this runs inside torch.compile traces.
        spatial = self.cfg.img_size_tuple() if spatial_shape is None else tuple([int(s) for s in spatial_shape])
        remainders = [s % p for s, p in zip(spatial, self._patch_size)]
        if len(spatial) != self.cfg.spatial_dims or max(remainders) > 0:
            raise ValueError(
                f"VisionTransformer: spatial shape {spatial} must have {self.cfg.spatial_dims} sizes, "
                f"each divisible by patch_size {self._patch_size}"
            )
        return tuple([s // p for s, p in zip(spatial, self._patch_size)])

    def num_patches(self, spatial_shape: tuple[int, ...] | list[int] | torch.Size | None = None) -> int:
        return math.prod(self.grid_size(spatial_shape))

    def no_weight_decay(self) -> set[str]:
        """Token and position parameters to keep out of weight decay (norms and biases: caller's rule)."""
        return {"pos_embed", "cls_token"} | ({"reg_token"} if self.reg_token is not None else set())

    # -------------------------------------------------------------------- init

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter as described in the class docstring."""
        if self.cfg.pos_embed == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.pos_embed.zero_()
            self.pos_embed[0, self.num_prefix_tokens :] = sincos_pos_embed(self.native_grid, self.embed_dim)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        self.patch_embed.proj.reset_parameters()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, LayerScale)):
                module.reset_parameters()

    # ----------------------------------------------------------------- forward

    def patch_pos_embed(self, grid: tuple[int, ...]) -> torch.Tensor:
        """Position embedding (1, prod(grid), D) of the patch tokens for ``grid``.

        The stored table is for the native grid; other grids get it resampled
        (learned: bicubic 2D / trilinear 3D) or recomputed exactly (sincos).
        """
        table = self.pos_embed[:, self.num_prefix_tokens :]
        if tuple(grid) == self.native_grid:
            return table
        if self.cfg.pos_embed == "sincos":
            return sincos_pos_embed(grid, self.embed_dim, reference_grid=self.native_grid).to(table)[None]
        return resample_pos_embed(table, self.native_grid, grid, num_prefix=0)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 2 + self.cfg.spatial_dims or x.shape[1] != self.cfg.in_chans:
            layout = "(B, C, H, W)" if self.cfg.spatial_dims == 2 else "(B, C, D, H, W)"
            raise ValueError(
                f"VisionTransformer: input must be {layout} with C={self.cfg.in_chans}, got {tuple(x.shape)}"
            )

    def forward_features(
        self,
        x: torch.Tensor,
        *,
        keep_idx: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens (B, num_prefix_tokens + patches, D) after the final norm.

        Args:
            x: (B, C, H, W) or (B, C, D, H, W).
            mask: (B, N) bool; True patches are replaced by ``mask_token`` (D,)
                before the position embedding is added (iBOT / DINOv2 masking).
            keep_idx: (B, N_keep) int64 patch indices to keep, gathered after the
                position embedding is added (MAE); the output then has N_keep patch tokens.
        """
        self._check_input(x)
        batch, dim = x.shape[0], self.embed_dim
        grid = self.grid_size(x.shape[2:])
        num_patches = math.prod(grid)
        pos_1ND = self.patch_pos_embed(grid)
        if mask is None:
            tokens_BND = self.patch_embed(x, pos_embed=pos_1ND)
        else:
            if mask.dtype != torch.bool or tuple(mask.shape) != (batch, num_patches):
                raise ValueError(
                    f"VisionTransformer: mask must be bool (B, N) = ({batch}, {num_patches}), "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            if mask_token is None or tuple(mask_token.shape) != (dim,):
                got = None if mask_token is None else tuple(mask_token.shape)
                raise ValueError(f"VisionTransformer: a mask needs mask_token of shape ({dim},), got {got}")
            tokens_BND = self.patch_embed(x)
            tokens_BND = torch.where(mask[..., None], mask_token.to(tokens_BND.dtype), tokens_BND) + pos_1ND
        if keep_idx is not None:
            if keep_idx.dtype != torch.int64 or keep_idx.ndim != 2 or keep_idx.shape[0] != batch:
                raise ValueError(
                    f"VisionTransformer: keep_idx must be int64 (B, N_keep) with B={batch}, "
                    f"got {keep_idx.dtype} {tuple(keep_idx.shape)}"
                )
            tokens_BND = tokens_BND.gather(1, keep_idx[..., None].expand(-1, -1, dim))
        prefix = [self.cls_token] if self.reg_token is None else [self.cls_token, self.reg_token]
        prefix_1PD = torch.cat(prefix, dim=1) + self.pos_embed[:, : self.num_prefix_tokens]
        x_BTD = torch.cat([prefix_1PD.to(tokens_BND.dtype).expand(batch, -1, -1), tokens_BND], dim=1)
        checkpointing = self.cfg.act_checkpoint and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointing:
                x_BTD = torch.utils.checkpoint.checkpoint(block, x_BTD, use_reentrant=False)
            else:
                x_BTD = block(x_BTD)
        return self.norm(x_BTD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class-token embedding (B, D), as timm's forward with num_classes=0, global_pool='token'."""
        return self.forward_features(x)[:, 0]

    def pool(self, x_BTD: torch.Tensor, mode: str = "cls") -> torch.Tensor:
        """Image embedding from ``forward_features`` output: "cls" (B, D), "mean" of the
        patch tokens (B, D) or "cls+mean" concatenated (B, 2D)."""
        return pool_tokens(x_BTD, self.num_prefix_tokens, mode)

    def forward_flops(
        self, spatial_shape: tuple[int, ...] | list[int] | None = None, num_tokens_kept: int | None = None
    ) -> float:
        """Forward matmul FLOPs (2 x multiply-adds) for one sample.

        Counts the patch embedding of every patch, then per block the qkv
        projection, attention scores, attention x values, output projection and
        MLP on the tokens actually processed: prefix + ``num_tokens_kept``
        patches (default all). Norms, softmax and elementwise ops are left out.
        """
        num_patches = self.num_patches(spatial_shape)
        kept = num_patches if num_tokens_kept is None else int(num_tokens_kept)
        if not 0 <= kept <= num_patches:
            raise ValueError(f"VisionTransformer.forward_flops: num_tokens_kept {kept} not in [0, {num_patches}]")
        tokens, dim = self.num_prefix_tokens + kept, self.embed_dim
        hidden = int(dim * self.cfg.mlp_ratio)
        patch_flops = 2 * num_patches * self.cfg.in_chans * math.prod(self._patch_size) * dim
        attn_flops = 2 * tokens * dim * 3 * dim + 2 * 2 * tokens * tokens * dim + 2 * tokens * dim * dim
        mlp_matmuls = 3 if self.cfg.mlp == "swiglu" else 2
        mlp_flops = 2 * mlp_matmuls * tokens * dim * hidden
        return float(patch_flops + self.cfg.depth * (attn_flops + mlp_flops))

    def patch_embed_flops(self, spatial_shape: tuple[int, ...] | list[int] | None = None) -> float:
        return float(2 * self.num_patches(spatial_shape) * self.cfg.in_chans * math.prod(self._patch_size) * self.embed_dim)

    def train_flops(
        self, spatial_shape: tuple[int, ...] | list[int] | None = None, num_tokens_kept: int | None = None
    ) -> float:
        """Forward + backward: every matmul's backward costs twice its forward (input and weight
        gradients), except the patch embedding's, whose input (the image) needs no gradient."""
        return 3.0 * self.forward_flops(spatial_shape, num_tokens_kept) - self.patch_embed_flops(spatial_shape)
