"""KoLeo regulariser: spreads the features of a batch uniformly over the sphere.

Kozachenko-Leonenko differential entropy estimator (Sablayrolles et al. 2019,
"Spreading vectors for similarity search"), used by DINOv2 on the student's
class tokens to keep features from bunching together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def koleo_loss(x_BD: Tensor, eps: float = 1e-8) -> Tensor:
    """L = -(1/B) * sum_i log( min_{j != i} ||x_i - x_j||_2 + eps ), x_i L2-normalised first.

    Computed in float32 with autocast off. A duplicated row has distance 0 and
    contributes the finite -log(eps). With B < 2 there is no neighbour: the
    loss is a zero still connected to the graph.
    """
    if x_BD.ndim != 2:
        raise ValueError(f"koleo_loss expects features (B, D), got shape {tuple(x_BD.shape)}")
    if x_BD.shape[0] < 2:
        return x_BD.float().sum() * 0.0
    with torch.autocast(device_type=x_BD.device.type, enabled=False):
        x_BD = F.normalize(x_BD.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            # For unit vectors the nearest neighbour is the largest dot product;
            # -inf on the diagonal excludes the point itself.
            similarity_BB = x_BD @ x_BD.t()
            similarity_BB.fill_diagonal_(-torch.inf)
            neighbour_B = similarity_BB.argmax(dim=1)
        distance_B = torch.linalg.vector_norm(x_BD - x_BD[neighbour_B], dim=-1)
        return -torch.log(distance_B + eps).mean()
