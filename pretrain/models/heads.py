"""Projection heads for self-distillation (DINO / iBOT prototypes).

The last layer is a weight-normalised linear map with its gain fixed at 1,
written out by hand: logits are cosine similarities between the bottleneck
feature and each prototype. torch's weight_norm parametrizations split the
weight into extra tensors that DeepSpeed ZeRO-3 partitioning handles badly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# Large enough to stay a normal number in fp16, so a zero vector normalises to zero, not NaN.
_NORM_EPS = 1e-6


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> cosine similarity with ``out_dim`` prototypes."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead needs nlayers >= 1, got {nlayers}")
        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        # Freezing the last layer (DINO does it for the first epoch) by detaching V:
        # V then never gets a gradient, so Adam's moments stay zero and its update is
        # zero; decoupled weight decay only rescales V, which the row normalisation
        # in forward cancels. So V's direction, all that forward uses, stays put.
        self.freeze_last_layer = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.last_layer_v, std=0.02)

    def forward(self, x_ND: Tensor) -> Tensor:
        """Features (N, in_dim) -> prototype logits (N, out_dim), each in [-1, 1]."""
        bottleneck_NE = F.normalize(self.mlp(x_ND), dim=-1, eps=_NORM_EPS)
        v_KE = self.last_layer_v.detach() if self.freeze_last_layer else self.last_layer_v
        prototypes_KE = F.normalize(v_KE, dim=1, eps=_NORM_EPS)
        return bottleneck_NE @ prototypes_KE.t()
