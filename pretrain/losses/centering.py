"""Teacher-target normalisation for self-distillation: Sinkhorn-Knopp and centering.

A teacher that always predicts the same prototype (collapse) gives a trivial
target; both methods here spread the teacher's mass over the prototypes. Both
work on the global batch when ``torch.distributed`` is initialised, so every
rank computes the targets the single-process run over the full batch would.
Everything is computed in float32: the teacher often runs in bf16/fp16, where
``exp(logits / temperature)`` overflows.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_(tensor: Tensor, op: dist.ReduceOp.RedOpType) -> Tensor:
    if _world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def _global_logsumexp_over_samples(log_q_KB: Tensor) -> Tensor:
    """log(sum_b exp(log_q[k, b])) over the samples of every rank, shape (K, 1)."""
    if log_q_KB.shape[1] > 0:
        max_K1 = log_q_KB.amax(dim=1, keepdim=True)
    else:
        max_K1 = log_q_KB.new_full((log_q_KB.shape[0], 1), -math.inf)
    _all_reduce_(max_K1, dist.ReduceOp.MAX)
    sum_K1 = torch.exp(log_q_KB - max_K1).sum(dim=1, keepdim=True)
    _all_reduce_(sum_K1, dist.ReduceOp.SUM)
    return max_K1 + torch.log(sum_K1)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits_BK: Tensor, temperature: float, iterations: int = 3) -> Tensor:
    """Teacher targets (B, K) by Sinkhorn-Knopp over the global batch (SwAV, DINOv2).

    With Q = exp(logits / temperature) seen as a K x B_global matrix
    (B_global = sum of the local batch sizes over ranks), each iteration does

        Q[k, :] <- Q[k, :] / (K * sum_b Q[k, b])      every prototype gets mass 1/K
        Q[:, b] <- Q[:, b] / (B_global * sum_k Q[k, b])  every sample gets mass 1/B_global

    and the result is B_global * Q transposed, so each sample's row sums to 1
    and, at convergence, each prototype's column sums to B_global / K. The sums
    over samples are all-reduced across ranks.

    The iterations run on log Q (each normalisation subtracts a logsumexp whose
    max is taken over the global batch), which is the same computation without
    overflow (huge logits, half precision) or underflow to an all-zero row or
    column (which the exp-domain version turns into 0/0). The initial
    normalisation to total mass 1 is a global constant that the first row
    normalisation removes, so it is skipped. Returns float32, no gradient.
    """
    if teacher_logits_BK.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects teacher logits (B, K), got shape {tuple(teacher_logits_BK.shape)}")
    if iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs iterations >= 1, got {iterations}")
    log_q_KB = teacher_logits_BK.float().t() / temperature
    num_prototypes = log_q_KB.shape[0]
    batch_global = torch.tensor(float(log_q_KB.shape[1]), device=log_q_KB.device)
    _all_reduce_(batch_global, dist.ReduceOp.SUM)
    # Kept as a tensor so that no host sync is needed on GPU.
    log_batch_global = torch.log(batch_global)
    log_num_prototypes = math.log(num_prototypes)

    for _ in range(iterations):
        log_q_KB = log_q_KB - _global_logsumexp_over_samples(log_q_KB) - log_num_prototypes
        log_q_KB = log_q_KB - torch.logsumexp(log_q_KB, dim=0, keepdim=True) - log_batch_global
    return torch.exp(log_q_KB + log_batch_global).t().contiguous()


def softmax_center(teacher_logits_BK: Tensor, center_1K: Tensor, temperature: float) -> Tensor:
    """DINO's centred teacher targets: softmax_k((logits[b, k] - center[k]) / temperature), float32."""
    return torch.softmax((teacher_logits_BK.float() - center_1K.float()) / temperature, dim=-1)


class RunningCenter(nn.Module):
    """Exponential moving average of the teacher logits over global batches (DINO centering).

    The ``center`` buffer (1, K) stays float32 when the module is cast to
    half precision (``_apply`` keeps its values and follows only device moves):
    a bf16 average at momentum 0.9+ loses most of each update.
    """

    center: Tensor

    def __init__(self, num_prototypes: int, momentum: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"RunningCenter momentum must lie in [0, 1], got {momentum}")
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, num_prototypes, dtype=torch.float32))

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        center_before = self.center
        super()._apply(fn, recurse)
        # A meta tensor has no values to keep (e.g. to_empty after meta-device construction).
        source = self.center if center_before.is_meta else center_before
        self.center = source.to(device=self.center.device, dtype=torch.float32)
        return self

    @torch.no_grad()
    def update(self, teacher_logits_BK: Tensor) -> None:
        """center <- m * center + (1 - m) * mean_b logits[b], the mean taken over the global batch."""
        logits_BK = teacher_logits_BK.float()
        sum_1K = logits_BK.sum(dim=0, keepdim=True)
        count = torch.tensor(float(logits_BK.shape[0]), device=logits_BK.device)
        _all_reduce_(sum_1K, dist.ReduceOp.SUM)
        _all_reduce_(count, dist.ReduceOp.SUM)
        batch_mean_1K = sum_1K / count
        self.center.mul_(self.momentum).add_(batch_mean_1K, alpha=1.0 - self.momentum)

    def probabilities(self, teacher_logits_BK: Tensor, temperature: float) -> Tensor:
        """softmax((logits - center) / temperature) with the current center, float32."""
        return softmax_center(teacher_logits_BK, self.center, temperature)
