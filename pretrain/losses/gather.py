"""A differentiable all-gather for contrastive losses over the global batch.

``torch.distributed.all_gather`` has no autograd: the gathered features of the
other ranks would be constants, and the negatives a rank contributes to every
other rank's loss would send it no gradient. :func:`gather_with_grad` sends
those gradients back, so the gathered loss trains like the single-process loss
on the concatenated batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def world_info(group: Any = None) -> tuple[int, int]:
    """(rank, world_size) of this process in ``group``; (0, 1) without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_gather_cat(x: Tensor, group: Any, world_size: int) -> Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order, no grad."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward all_reduce(SUM) then this rank's slice.

    The gathered tensor feeds every rank's loss, so the gradient of the summed
    losses w.r.t. this rank's ``x`` is the sum over ranks of their gradients
    w.r.t. its slice. all_reduce + slicing instead of reduce_scatter because
    gloo has no reduce_scatter.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: Any, rank: int, world_size: int) -> Tensor:  # type: ignore[override]
        ctx.group, ctx.rank, ctx.batch = group, rank, x.shape[0]
        return _all_gather_cat(x, group, world_size)

    @staticmethod
    def backward(ctx, grad_GD: Tensor):  # type: ignore[override]
        grad_GD = grad_GD.contiguous().clone()  # all_reduce is in place; autograd may share grad_output
        dist.all_reduce(grad_GD, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.batch
        return grad_GD[start:start + ctx.batch], None, None, None


def gather_with_grad(x: Tensor, group: Any = None) -> Tensor:
    """Concatenation over the ranks of ``group`` (rank order) of each rank's ``x``, differentiable.

    ``x`` must have the same shape on every rank. The backward gives each rank
    the sum over ranks of the gradients w.r.t. its own slice, so every rank
    must run the backward (it is a collective). Non-float tensors (ids) are
    gathered the same way and simply carry no grad. Without torch.distributed,
    or with a group of one, ``x`` is returned unchanged.
    """
    rank, world_size = world_info(group)
    if world_size == 1:
        return x
    if not (x.is_floating_point() or x.is_complex()):
        return _all_gather_cat(x, group, world_size)
    return _GatherWithGrad.apply(x, group, rank, world_size)


def check_pairs(loss: str, image: Tensor, text: Tensor, image_ids: Tensor, text_ids: Tensor) -> None:
    """The contrastive losses' inputs: image and text features of one shape (B, D), ids of shape (B,)."""
    if image.ndim != 2 or image.shape != text.shape:
        raise ValueError(f"{loss} expects image and text features of one shape (B, D), "
                         f"got {tuple(image.shape)} and {tuple(text.shape)}")
    batch = image.shape[0]
    if image_ids.shape != (batch,) or text_ids.shape != (batch,):
        raise ValueError(f"{loss} expects ids of shape ({batch},), "
                         f"got {tuple(image_ids.shape)} and {tuple(text_ids.shape)}")
