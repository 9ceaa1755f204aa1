"""DINO's cross-view distillation loss on the class-token prototypes.

Each student crop is pulled towards the teacher's targets of every *other*
global crop, so the student has to predict a view it did not see.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dino_loss(student_logits: list[Tensor], teacher_probs: list[Tensor], student_temp: float) -> Tensor:
    """Mean cross-entropy between teacher targets and student predictions of different crops.

    ``student_logits`` holds one (B, K) tensor per crop, the global crops first
    and in the order of ``teacher_probs`` (one (B, K) target per global crop).
    With p_s = log_softmax(z_s / student_temp) and P = {(s, t) : s != t}:

        L = 1/|P| * sum_{(s, t) in P} 1/B * sum_b ( -sum_k q_t[b, k] * p_s[b, k] )

    Computed in float32. The targets are used as given: pass them without grad.
    """
    num_student, num_teacher = len(student_logits), len(teacher_probs)
    if num_student < 2:
        raise ValueError(f"dino_loss needs at least 2 crops to pair different views, got {num_student}")
    if num_teacher < 1 or num_teacher > num_student:
        raise ValueError(
            f"dino_loss needs 1 to {num_student} teacher crops (the global crops among the {num_student} "
            f"student crops), got {num_teacher}"
        )
    shape = tuple(teacher_probs[0].shape)
    if len(shape) != 2:
        raise ValueError(f"dino_loss expects (B, K) tensors, teacher crop 0 has shape {shape}")
    for name, tensors in (("student", student_logits), ("teacher", teacher_probs)):
        for index, tensor in enumerate(tensors):
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"dino_loss expects every crop to have shape {shape} (teacher crop 0), "
                    f"{name} crop {index} has shape {tuple(tensor.shape)}"
                )

    log_probs = [torch.log_softmax(logits.float() / student_temp, dim=-1) for logits in student_logits]
    # sum over s != t of q_t . p_s = q_t . (sum_s p_s - p_t): one product per teacher crop, not per pair.
    log_probs_sum_BK = torch.stack(log_probs).sum(dim=0)
    total = log_probs_sum_BK.new_zeros(())
    for t, probs_BK in enumerate(teacher_probs):
        cross_BK = probs_BK.float() * (log_probs_sum_BK - log_probs[t])
        total = total - cross_BK.sum(dim=-1).mean()
    num_pairs = num_student * num_teacher - num_teacher
    return total / num_pairs
