"""Symmetric InfoNCE (CLIP) over the global batch, with several positives per row.

Pairs are given by ids: image i and text j are positives iff
``image_ids[i] == text_ids[j]``, so several reports per image, several images
per study, or every image of a class against that class's prompts are all
positives. With unique ids this is CLIP's loss (positives on the diagonal).

With s the logit scale, x / y the L2-normalised image / text features of the
global batch G, P(i) the texts positive for image i and P(j) the images
positive for text j:

    L_i2t(i) = -1/|P(i)| * sum_{j in P(i)} log softmax_k( s <x_i, y_k> )[j]
    L_t2i(j) = -1/|P(j)| * sum_{i in P(j)} log softmax_k( s <y_j, x_k> )[i]

(cross-entropy against the uniform distribution over the row's positives) and
the loss of the global batch is 0.5 * (mean_i L_i2t(i) + mean_j L_t2i(j)).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pretrain.losses.gather import check_pairs, gather_with_grad


def _soft_target_cross_entropy(logits_BG: Tensor, positive_BG: Tensor, direction: str) -> Tensor:
    """Mean over rows of the cross-entropy against the uniform distribution over each row's positives."""
    count_B = positive_BG.sum(dim=1)
    if bool((count_B == 0).any()):
        row = int((count_B == 0).nonzero()[0])
        raise ValueError(
            f"infonce_loss: {direction} row {row} of this rank has no positive in the global batch "
            "(no id equal to its own): every sample's pair must share its id"
        )
    log_probs_BG = torch.log_softmax(logits_BG, dim=1)
    positive_log_prob_B = torch.where(positive_BG, log_probs_BG, torch.zeros_like(log_probs_BG)).sum(dim=1)
    return -(positive_log_prob_B / count_B).mean()


def infonce_loss(image: Tensor, text: Tensor, logit_scale: Tensor, image_ids: Tensor, text_ids: Tensor,
                 group: Any = None) -> Tensor:
    """This rank's rows of the symmetric InfoNCE against the global batch (open_clip's "local loss").

    ``image`` / ``text``: this rank's L2-normalised features (B, D), the same B
    on every rank; ``logit_scale``: the exponentiated, clamped scale, a 0-d
    tensor that may require grad; ``image_ids`` / ``text_ids``: int64 (B,) pair
    ids. Features and ids of every rank of ``group`` are gathered (features
    with :func:`gather_with_grad`); this rank computes only its own rows,
    image->text (B, B_global) and text->image (B, B_global): memory
    O(B * B_global), not O(B_global^2). Computed in float32 at least (float64
    stays float64) with autocast off. A row without a positive raises
    ValueError (the check costs one host sync).

    Gradient convention: the value is the mean over this rank's rows. Each
    rank's features also get gradients from every other rank's loss through
    the gather, so a rank's feature gradient is world_size x the gradient of
    the global-mean loss; the data-parallel gradient average over ranks
    (DeepSpeed's) turns that into the exact gradient of the global loss on the
    concatenated batch. ``logit_scale`` is not gathered: each rank's gradient is
    that of its own rows, and the average over ranks is again exact. With one
    process it is the ordinary CLIP loss.
    """
    check_pairs("infonce_loss", image, text, image_ids, text_ids)
    dtype = torch.promote_types(image.dtype, torch.float32)
    with torch.autocast(device_type=image.device.type, enabled=False):
        image_BD, text_BD, scale = image.to(dtype), text.to(dtype), logit_scale.to(dtype)
        image_GD, text_GD = gather_with_grad(image_BD, group), gather_with_grad(text_BD, group)
        image_ids_G, text_ids_G = gather_with_grad(image_ids, group), gather_with_grad(text_ids, group)
        logits_i2t_BG = scale * (image_BD @ text_GD.t())
        logits_t2i_BG = scale * (text_BD @ image_GD.t())
        loss_i2t = _soft_target_cross_entropy(logits_i2t_BG, image_ids[:, None] == text_ids_G[None, :], "image")
        loss_t2i = _soft_target_cross_entropy(logits_t2i_BG, text_ids[:, None] == image_ids_G[None, :], "text")
        return 0.5 * (loss_i2t + loss_t2i)
