"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training").

Every image-text pair is an independent binary classification, so no softmax
normaliser couples a row to the whole batch and the loss splits into chunks.
With t the logit scale, b the logit bias, x / y the L2-normalised image / text
features of the global batch G and z_ij = +1 if image_ids[i] == text_ids[j]
(a positive pair), -1 otherwise:

    L = -1/|G| * sum_{i in G} sum_{j in G} log sigmoid( z_ij * (t <x_i, y_j> + b) )
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.losses.gather import check_pairs, gather_with_grad, world_info


def _pair_log_sigmoid_sum(image_BD: Tensor, text_CD: Tensor, scale: Tensor, bias: Tensor,
                          image_ids_B: Tensor, text_ids_C: Tensor) -> Tensor:
    """sum_{i, j} log sigmoid(z_ij * (t <x_i, y_j> + b)) over one block of pairs."""
    logits_BC = scale * (image_BD @ text_CD.t()) + bias
    sign_BC = 2.0 * (image_ids_B[:, None] == text_ids_C[None, :]).to(logits_BC.dtype) - 1.0
    return F.logsigmoid(sign_BC * logits_BC).sum()


def siglip_loss(image: Tensor, text: Tensor, logit_scale: Tensor, logit_bias: Tensor, image_ids: Tensor,
                text_ids: Tensor, group: Any = None) -> Tensor:
    """This rank's image rows of the sigmoid loss against every rank's texts.

    ``image`` / ``text``: this rank's L2-normalised features (B, D), the same B
    on every rank; ``logit_scale`` / ``logit_bias``: 0-d tensors (t already
    exponentiated), may require grad; ids int64 (B,). Texts and ids of every
    rank of ``group`` are gathered (texts with :func:`gather_with_grad`) and
    taken one rank's chunk (B x B logits) at a time, so no rank ever holds the
    B_global x B_global matrix. The loss on this rank is

        -1/B * sum_{i local} sum_{j in G} log sigmoid(z_ij * (t <x_i, y_j> + b)),

    whose mean over ranks is L. Same gradient convention as
    :func:`pretrain.losses.infonce_loss.infonce_loss`: feature gradients are
    world_size x those of L (the texts through the gather), the scale and bias
    ones are this rank's share; the data-parallel average over ranks makes both
    exact. Computed in float32 at least (float64 stays float64), autocast off.
    """
    check_pairs("siglip_loss", image, text, image_ids, text_ids)
    batch = image.shape[0]
    _, world_size = world_info(group)
    dtype = torch.promote_types(image.dtype, torch.float32)
    with torch.autocast(device_type=image.device.type, enabled=False):
        image_BD, scale, bias = image.to(dtype), logit_scale.to(dtype), logit_bias.to(dtype)
        text_GD = gather_with_grad(text.to(dtype), group)
        text_ids_G = gather_with_grad(text_ids, group)
        total = image_BD.new_zeros(())
        for chunk in range(world_size):
            rows = slice(chunk * batch, (chunk + 1) * batch)
            total = total + _pair_log_sigmoid_sum(image_BD, text_GD[rows], scale, bias, image_ids, text_ids_G[rows])
        return -total / batch


def siglip_loss_dense(image: Tensor, text: Tensor, logit_scale: Tensor, logit_bias: Tensor, image_ids: Tensor,
                      text_ids: Tensor) -> Tensor:
    """L on one process with the full (B, B) logit matrix: the reference for :func:`siglip_loss`."""
    check_pairs("siglip_loss_dense", image, text, image_ids, text_ids)
    dtype = torch.promote_types(image.dtype, torch.float32)
    with torch.autocast(device_type=image.device.type, enabled=False):
        logits_BB = logit_scale.to(dtype) * (image.to(dtype) @ text.to(dtype).t()) + logit_bias.to(dtype)
        positive_BB = image_ids[:, None] == text_ids[None, :]
        sign_BB = torch.where(positive_BB, torch.ones_like(logits_BB), -torch.ones_like(logits_BB))
        return -F.logsigmoid(sign_BB * logits_BB).sum() / image.shape[0]
