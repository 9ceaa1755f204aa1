"""The ``Encoder`` protocol that objectives, evaluation and export rely on.

An encoder maps ``(B, C, *spatial)`` to tokens ``(B, P + N, D)``: ``P`` prefix
tokens (a ViT's class and register tokens; a CNN's global average pool) then
``N`` tokens on the output grid in row-major order (patches, or feature-map
cells). ``pool`` turns tokens into one vector per image:

- ``cls``: token 0 (the class token; for a CNN the global average pool),
- ``mean``: the mean of the N grid tokens,
- ``cls+mean``: both, concatenated (width 2D).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol, runtime_checkable

import torch

POOL_MODES = ("cls", "mean", "cls+mean")


@runtime_checkable
class Encoder(Protocol):
    spatial_dims: int  # 2 or 3
    in_chans: int
    embed_dim: int  # width D of one token
    num_prefix_tokens: int
    supports_token_mask: bool  # forward_features accepts mask= / keep_idx= (ViT only)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> (B, num_prefix_tokens + N, D), after the final norm."""

    def pool(self, tokens: torch.Tensor, mode: str = "cls") -> torch.Tensor:
        """(B, T, D) -> (B, D), or (B, 2D) for ``cls+mean``."""

    def grid_size(self, spatial_shape=None) -> tuple[int, ...]:
        """The output grid of an input of ``spatial_shape``."""

    def train_flops(self, spatial_shape, num_tokens_kept: int | None = None) -> float:
        """FLOPs of forward + backward for one sample (trainable weights, input without gradient)."""

    def forward_flops(self, spatial_shape, num_tokens_kept: int | None = None) -> float:
        """FLOPs of the forward alone for one sample."""


def pool_tokens(tokens_BTD: torch.Tensor, num_prefix_tokens: int, mode: str) -> torch.Tensor:
    """The pooling every encoder shares (see the module docstring)."""
    if mode not in POOL_MODES:
        raise ValueError(f"pool mode {mode!r} is not one of {POOL_MODES}")
    cls_BD = tokens_BTD[:, 0]
    if mode == "cls":
        return cls_BD
    mean_BD = tokens_BTD[:, num_prefix_tokens:].mean(dim=1)
    return mean_BD if mode == "mean" else torch.cat([cls_BD, mean_BD], dim=-1)


def pooled_width(encoder: Encoder, mode: str) -> int:
    return 2 * encoder.embed_dim if mode == "cls+mean" else encoder.embed_dim


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` in eval mode (no dropout, drop-path, batch-norm updates) for the block, then as it was."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
