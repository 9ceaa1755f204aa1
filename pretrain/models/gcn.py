"""A graph convolutional network over batches of small dense graphs (Kipf and Welling 2017)."""
from __future__ import annotations

import torch
from torch import nn


class GCN(nn.Module):
    """H_l = act(P H_{l-1} W_l + b_l) for a propagation matrix P (G, n, n); the activation between layers only.

    With ``residual``, H_l = act(P H_{l-1} W_l + b_l + H_{l-1}) wherever the widths agree (DeepGCNs' skip,
    Li et al. 2019): P averages each node with its neighbours, and two such layers over a 16-node graph of
    degree ~6 leave a node little of its own features; the skip keeps them.
    """

    def __init__(self, in_dim: int, width: int, layers: int = 2, residual: bool = False) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"GCN needs layers >= 1, got {layers}")
        self.residual = residual
        dims = [in_dim] + [width] * layers
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        for linear in self.linears:
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, h_GND: torch.Tensor, propagation_GNN: torch.Tensor) -> torch.Tensor:
        for index, linear in enumerate(self.linears):
            skip = h_GND if self.residual and linear.in_features == linear.out_features else None
            h_GND = propagation_GNN.to(h_GND.dtype) @ (h_GND @ linear.weight.t()) + linear.bias
            if skip is not None:
                h_GND = h_GND + skip
            if index < len(self.linears) - 1:
                h_GND = torch.relu(h_GND)
        return h_GND

    def train_flops(self, nodes: int) -> float:
        """Forward + backward FLOPs per graph of ``nodes`` nodes: the linear maps cost three times their
        forward; the propagation twice (the adjacency is data, it gets no gradient)."""
        linear = sum(2 * nodes * l.in_features * l.out_features for l in self.linears)
        propagation = sum(2 * nodes * nodes * l.out_features for l in self.linears)
        return float(3 * linear + 2 * propagation)
