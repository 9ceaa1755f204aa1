"""Absolute position embeddings for 2D and 3D patch grids.

Fixed sin-cos tables and the resampling of learned tables to another grid.
Tokens are always in row-major order over the grid (last axis fastest), the
order ``kernels.patch_embed`` produces.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def grid_coordinates(grid: Sequence[int], reference_grid: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Per axis, the (float64) coordinate of every grid cell in units of ``reference_grid`` cells.

    Without a reference (or when it equals ``grid``) the coordinates are the
    integer indices 0..g-1. Otherwise cell centres are mapped so that the new
    grid spans the same extent as the reference one, the convention of
    ``F.interpolate(align_corners=False)``: coordinate = (i + 0.5) * ref / g - 0.5.
    """
    reference_grid = grid if reference_grid is None else reference_grid
    coords = []
    for g, ref in zip(grid, reference_grid):
        index = torch.arange(g, dtype=torch.float64)
        coords.append(index if g == ref else (index + 0.5) * (ref / g) - 0.5)
    return coords


def sincos_pos_embed(
    grid: Sequence[int],
    embed_dim: int,
    *,
    reference_grid: Sequence[int] | None = None,
    temperature: float = 10000.0,
) -> torch.Tensor:
    """Fixed sin-cos position embedding of an N-d grid, shape (prod(grid), embed_dim), float32.

    The channels are split evenly across the axes, first axis first: every
    axis gets F = embed_dim // (2 * ndim) frequencies omega_j = temperature^(-j/F)
    and contributes [sin(c * omega), cos(c * omega)] (2F channels) for its
    coordinate c. When embed_dim is not a multiple of 2 * ndim (e.g. 3D with
    embed_dim 1024: 3 * 2 * 170 = 1020), the few remaining last channels are
    zero, so every axis keeps the same frequencies and no axis is favoured.

    ``reference_grid``: the grid the model was built for. For another grid the
    coordinates are those at which interpolating the reference table would
    sample (see ``grid_coordinates``), evaluated exactly: a sin-cos model and a
    learned one treat a resized input the same way (stretched to the same extent).
    """
    ndim = len(grid)
    freqs_per_axis = embed_dim // (2 * ndim)
    if freqs_per_axis < 1:
        raise ValueError(
            f"sincos_pos_embed: embed_dim {embed_dim} is too small for a {ndim}-D grid (needs >= {2 * ndim})"
        )
    omega = temperature ** (-torch.arange(freqs_per_axis, dtype=torch.float64) / freqs_per_axis)
    axes = torch.meshgrid(*grid_coordinates(grid, reference_grid), indexing="ij")
    parts = []
    for coord in axes:
        angle_NF = coord.reshape(-1, 1) * omega[None, :]
        parts += [torch.sin(angle_NF), torch.cos(angle_NF)]
    table_ND = torch.cat(parts, dim=1)
    leftover = embed_dim - table_ND.shape[1]
    table_ND = F.pad(table_ND, (0, leftover))
    return table_ND.float()


def resample_pos_embed(
    pos_BND: torch.Tensor,
    old_grid: Sequence[int],
    new_grid: Sequence[int],
    num_prefix: int,
) -> torch.Tensor:
    """Resize the patch part of a position table from ``old_grid`` to ``new_grid``.

    ``pos_BND`` is (B, num_prefix + prod(old_grid), D); the first ``num_prefix``
    rows (class/register tokens) are kept as they are. 2D grids use bicubic
    interpolation with antialiasing (as timm's ``resample_abs_pos_embed``, so an
    exported model sees the same table in timm), 3D grids trilinear; both with
    align_corners=False. Computed in float32, returned in the input dtype.
    Returns the input itself when the grids are equal.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if len(old_grid) != len(new_grid) or len(old_grid) not in (2, 3):
        raise ValueError(f"resample_pos_embed: grids {old_grid} and {new_grid} must both be 2-D or both 3-D")
    expected = num_prefix + math.prod(old_grid)
    if pos_BND.ndim != 3 or pos_BND.shape[1] != expected:
        raise ValueError(
            f"resample_pos_embed: pos_BND {tuple(pos_BND.shape)} must be (B, {expected}, D) for "
            f"{num_prefix} prefix tokens and grid {old_grid}"
        )
    if old_grid == new_grid:
        return pos_BND
    batch, _, dim = pos_BND.shape
    prefix, patches = pos_BND[:, :num_prefix], pos_BND[:, num_prefix:]
    # (B, N, D) -> (B, D, *grid): channels-first for F.interpolate.
    patches_grid = patches.float().reshape(batch, *old_grid, dim).movedim(-1, 1)
    if len(old_grid) == 2:
        resized = F.interpolate(patches_grid, size=new_grid, mode="bicubic", align_corners=False, antialias=True)
    else:
        resized = F.interpolate(patches_grid, size=new_grid, mode="trilinear", align_corners=False)
    resized_BND = resized.movedim(1, -1).reshape(batch, math.prod(new_grid), dim).to(pos_BND.dtype)
    return torch.cat([prefix, resized_BND], dim=1)
