"""Masked autoencoding (He et al. 2022) for 2D images and 3D volumes.

A random ``mask_ratio`` of patches is hidden; the encoder sees only the
visible patches, a light decoder fills in mask tokens and predicts the pixels
of every patch, and the loss is the mean squared error on the masked patches,
against per-patch normalised pixels (``norm_pix_loss``).

Masks come from per-sample noise drawn on the CPU side from the sample's own
seed, so a resumed run hides exactly the patches an uninterrupted one would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from pretrain.config.registry import register_objective
from pretrain.config.typed import ConfigError, check_fraction_pair
from pretrain.data.transforms import augmented_view, sample_rng
from pretrain.models.blocks import Block
from pretrain.models.pos_embed import sincos_pos_embed
from pretrain.models.vit import VisionTransformer
from pretrain.objectives.base import BuildContext, DataRecipe, EvalBundle, Objective

NAME = "mae"


@dataclass
class Config:
    name: str = NAME  # "mae": masked autoencoding (this section's schema)
    mask_ratio: float = 0.75  # fraction of patches hidden from the encoder, in (0, 1)
    decoder_dim: int = 512  # token width of the decoder
    decoder_depth: int = 8  # transformer blocks of the decoder
    decoder_heads: int = 16  # attention heads per decoder block
    norm_pix_loss: bool = True  # targets are each patch's pixels normalised to zero mean, unit variance
    crop_scale: tuple[float, float] = (0.2, 1.0)  # random resized crop: (low, high) area/volume fraction kept
    flip_axes: list[int] = field(default_factory=lambda: [-1])  # spatial axes flipped at random; [] for none
    # The class token reaches the decoder, which reads it as a global summary when
    # most patches are hidden: it is MAE's best single feature for kNN and probes.
    eval_pool: Literal["cls", "mean", "cls+mean"] = "cls"  # token pooling of kNN eval and export (eval.pool overrides)

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"objective.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        check_fraction_pair("objective.crop_scale", self.crop_scale)


def patchify(x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B, N, prod(patch) * C)``, patches in row-major grid order."""
    B, C, *spatial = x.shape
    n = len(spatial)
    grid = [s // p for s, p in zip(spatial, patch)]
    shape = [B, C]
    for g, p in zip(grid, patch):
        shape += [g, p]
    x = x.reshape(shape)
    # (B, C, g0, p0, g1, p1, ...) -> (B, g0, g1, ..., p0, p1, ..., C)
    perm = [0] + [2 + 2 * i for i in range(n)] + [3 + 2 * i for i in range(n)] + [1]
    return x.permute(perm).reshape(B, math.prod(grid), math.prod(patch) * C)


def unpatchify(x_BNP: torch.Tensor, patch: tuple[int, ...], grid: tuple[int, ...], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    B, n = x_BNP.shape[0], len(grid)
    x = x_BNP.reshape(B, *grid, *patch, channels)
    perm = [0, 1 + 2 * n] + [j for i in range(n) for j in (1 + i, 1 + n + i)]
    x = x.permute(perm)
    return x.reshape(B, channels, *[g * p for g, p in zip(grid, patch)])


class MAERecipe(DataRecipe):
    """Random resized crop, flips, and the per-patch noise that decides the mask."""

    def __init__(self, cfg: Config, img_size: tuple[int, ...], in_chans: int, intensity: str, num_patches: int) -> None:
        self.cfg, self.img_size, self.in_chans = cfg, img_size, in_chans
        self.intensity, self.num_patches = intensity, num_patches

    def whole_view_size(self) -> tuple[int, ...]:
        return tuple(self.img_size)

    def transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        rng = sample_rng(sample)
        x = augmented_view(sample, rng, self.img_size, self.in_chans, self.intensity, self.cfg.crop_scale,
                           self.cfg.flip_axes)
        noise = torch.from_numpy(rng.random(self.num_patches, dtype="float32"))
        return {"image": x.contiguous(), "mask_noise": noise}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {"image": torch.stack([s["image"] for s in samples]),
                "mask_noise": torch.stack([s["mask_noise"] for s in samples])}


class MAE(Objective):
    def __init__(self, run_cfg, ctx: BuildContext) -> None:
        super().__init__(ctx)
        self.cfg: Config = run_cfg.objective
        if run_cfg.model.name != "vit":
            raise ConfigError(f"config key 'model.name': MAE hides patches by dropping ViT tokens and needs "
                              f"model.name=vit, got {run_cfg.model.name!r} (DINO takes timm and MONAI backbones)")
        self.backbone = VisionTransformer(run_cfg.model)
        enc = self.backbone
        self.img_size = run_cfg.model.img_size_tuple()
        self.patch = enc.patch_size
        self.grid = enc.grid_size(self.img_size)
        self.num_patches = math.prod(self.grid)
        self.len_keep = max(1, int(round(self.num_patches * (1 - self.cfg.mask_ratio))))
        d = self.cfg.decoder_dim
        self.decoder_embed = nn.Linear(enc.embed_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        # Fixed sin-cos positions for [cls] + patches, as a non-trainable parameter so ZeRO-3 partitions it too.
        pos = torch.cat([torch.zeros(1, d), sincos_pos_embed(self.grid, d)])
        self.decoder_pos_embed = nn.Parameter(pos.unsqueeze(0), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(d, self.cfg.decoder_heads, 4 * d, qkv_bias=True)
            for _ in range(self.cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_pred = nn.Linear(d, math.prod(self.patch) * run_cfg.model.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self._recipe = MAERecipe(self.cfg, self.img_size, run_cfg.model.in_chans, run_cfg.data.intensity,
                                 self.num_patches)

    def data_recipe(self) -> MAERecipe:
        return self._recipe

    # --- device side ----------------------------------------------------------------------
    def masking(self, noise_BN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keep_idx B x K, restore_idx B x N, mask B x N with 1 = hidden) from per-sample noise."""
        shuffle = torch.argsort(noise_BN, dim=1)
        restore = torch.argsort(shuffle, dim=1)
        keep = shuffle[:, : self.len_keep]
        mask = torch.ones_like(noise_BN)
        mask[:, : self.len_keep] = 0
        return keep, restore, torch.gather(mask, 1, restore)

    def decode(self, latent_BTD: torch.Tensor, restore_BN: torch.Tensor) -> torch.Tensor:
        """Predicted pixels ``(B, N, prod(patch) * C)`` for every patch."""
        prefix = self.backbone.num_prefix_tokens
        x = self.decoder_embed(latent_BTD)
        cls, visible = x[:, :1], x[:, prefix:]  # registers carry no position: the decoder drops them
        B, K, D = visible.shape
        filled = torch.cat([visible, self.mask_token.expand(B, self.num_patches - K, D)], dim=1)
        filled = torch.gather(filled, 1, restore_BN.unsqueeze(-1).expand(-1, -1, D))
        x = torch.cat([cls, filled], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def target(self, images: torch.Tensor) -> torch.Tensor:
        t = patchify(images.float(), self.patch)
        if self.cfg.norm_pix_loss:
            mean, var = t.mean(dim=-1, keepdim=True), t.var(dim=-1, keepdim=True)
            t = (t - mean) / (var + 1e-6).sqrt()
        return t

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"].to(self.compute_dtype)
        keep, restore, mask = self.masking(batch["mask_noise"].float())
        latent = self.backbone.forward_features(images, keep_idx=keep)
        pred = self.decode(latent, restore).float()
        per_patch = (pred - self.target(batch["image"])).pow(2).mean(dim=-1)
        loss = (per_patch * mask).sum() / mask.sum()
        visible_mse = (per_patch * (1 - mask)).sum() / (1 - mask).sum().clamp_min(1)
        prefix = self.backbone.num_prefix_tokens
        return {"loss": loss, "visible_mse": visible_mse.detach(), "_pred": pred.detach(), "_mask": mask,
                # for the trainer's collapse monitor: class token and mean of the visible patch tokens
                "_embed/encoder/cls": latent[:, 0].detach(), "_embed/encoder/patch": latent[:, prefix:].mean(1).detach()}

    # --- hooks ----------------------------------------------------------------------------
    def eval_bundle(self) -> EvalBundle:
        return EvalBundle({"encoder": self.backbone}, pool=self.cfg.eval_pool)

    def tokens_per_sample(self) -> int:
        return self.len_keep + self.backbone.num_prefix_tokens

    def flops_per_sample(self) -> float:
        """Encoder on the visible tokens and decoder on all, forward + backward (matmuls only)."""
        enc = self.backbone.train_flops(self.img_size, num_tokens_kept=self.len_keep)
        d, t = self.cfg.decoder_dim, self.num_patches + 1
        # per decoder block: qkv + proj (4 d^2), MLP (8 d^2) per token, scores + weighted sum (2 t d); 2 FLOPs per MAC
        per_block = 2 * t * (4 * d * d + 8 * d * d) + 2 * 2 * t * t * d
        dec = self.cfg.decoder_depth * per_block + 2 * t * d * self.decoder_pred.out_features
        embed = 2 * self.tokens_per_sample() * self.backbone.embed_dim * d  # decoder_embed on the visible tokens
        return enc + 3.0 * (dec + embed)  # the decoder's backward is twice its forward

    @torch.no_grad()
    def visualize(self, batch: dict[str, Any], outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Original | masked | reconstruction of the first sample (middle slice of a volume)."""
        image = batch["image"][:1].float().cpu()
        pred, mask = outputs["_pred"][:1].float().cpu(), outputs["_mask"][:1].float().cpu()
        channels = image.shape[1]
        if self.cfg.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
            t = patchify(image, self.patch)
            pred = pred * (t.var(dim=-1, keepdim=True) + 1e-6).sqrt() + t.mean(dim=-1, keepdim=True)
        recon = unpatchify(pred, self.patch, self.grid, channels)
        pixel_mask = unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]), self.patch, self.grid, channels)
        panels = [image, image * (1 - pixel_mask), recon * pixel_mask + image * (1 - pixel_mask)]
        if image.ndim == 5:
            mid = image.shape[2] // 2
            panels = [p[:, :, mid] for p in panels]
        row = torch.cat([p[0] for p in panels], dim=-1)
        lo, hi = row.min(), row.max()
        row = (row - lo) / (hi - lo).clamp_min(1e-6)
        return {"mae/original_masked_reconstruction": row[:3] if channels >= 3 else row[:1]}


def build(run_cfg, ctx: BuildContext) -> MAE:
    return MAE(run_cfg, ctx)


register_objective(NAME, Config, build)
