"""iBOT's masked-patch distillation loss.

The student sees a masked global crop and predicts, at every masked patch,
the teacher's prototype distribution for the unmasked patch. Images are
weighted equally, whatever their number of masked patches, so that heavily
masked images do not dominate the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ibot_loss(
    student_patch_logits_MK: Tensor,
    teacher_patch_probs_MK: Tensor,
    sample_index_M: Tensor,
    batch_size: int,
    student_temp: float,
    divide_by: str = "masked_images",
) -> Tensor:
    """Per-image mean cross-entropy over masked patches, averaged over images.

    Row m of the (M, K) inputs is a masked patch of image ``sample_index_M[m]``
    (in [0, batch_size)). With n_b the number of masked patches of image b and
    I = {b : n_b >= 1}:

        ce_m = -sum_k q[m, k] * log_softmax(z[m] / student_temp)[k]
        L    = 1/Z * sum_{b in I} 1/n_b * sum_{m : index[m] = b} ce_m

    with Z = |I| for ``divide_by="masked_images"`` (the scale does not depend on
    how many images were left unmasked) or Z = batch_size for ``"batch"``
    (DINOv2's ``forward_masked``: unmasked images count as zeros).
    With M == 0 the loss is a zero still connected to the student's graph.
    Computed in float32. The targets are used as given: pass them without grad.
    """
    if student_patch_logits_MK.ndim != 2 or student_patch_logits_MK.shape != teacher_patch_probs_MK.shape:
        raise ValueError(
            "ibot_loss expects student logits and teacher probabilities of the same shape (M, K), got "
            f"{tuple(student_patch_logits_MK.shape)} and {tuple(teacher_patch_probs_MK.shape)}"
        )
    if divide_by not in ("masked_images", "batch"):
        raise ValueError(f"ibot_loss: divide_by must be 'masked_images' or 'batch', got {divide_by!r}")
    num_masked = student_patch_logits_MK.shape[0]
    if sample_index_M.shape != (num_masked,):
        raise ValueError(
            f"ibot_loss expects sample_index_M of shape ({num_masked},), got {tuple(sample_index_M.shape)}"
        )
    if num_masked == 0:
        return student_patch_logits_MK.float().sum() * 0.0

    log_probs_MK = torch.log_softmax(student_patch_logits_MK.float() / student_temp, dim=-1)
    cross_entropy_M = -(teacher_patch_probs_MK.float() * log_probs_MK).sum(dim=-1)
    index_M = sample_index_M.long()
    # index_add_ rather than bincount: no host sync on GPU.
    masked_per_image_B = cross_entropy_M.new_zeros(batch_size).index_add_(0, index_M, torch.ones_like(cross_entropy_M))
    weight_M = 1.0 / masked_per_image_B[index_M]
    denominator = (masked_per_image_B > 0).sum() if divide_by == "masked_images" else batch_size
    return (cross_entropy_M * weight_M).sum() / denominator
