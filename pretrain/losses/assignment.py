"""Exact linear assignment for a batch of square cost matrices, on their own device.

The shortest-augmenting-path Hungarian method (Kuhn-Munkres with potentials,
O(n^3) per matrix), vectorised over the batch: every matrix advances through
the same fixed sequence of steps, and a matrix whose augmenting path is already
found simply stops changing (masked updates). The loops run over the matrix
size n, never over the batch, and nothing leaves the device, so a training step
with hundreds of 16 x 16 problems costs the same number of kernel launches as
one. Computed in float64: the rounding of the potentials must not decide which
of two assignments is optimal.
"""
from __future__ import annotations

import torch


def linear_assignment(scores: torch.Tensor, maximize: bool = True) -> torch.Tensor:
    """Permutation ``(B, n)`` with ``perm[b, i]`` the column of row ``i``, optimal for every matrix of
    ``scores`` ``(B, n, n)`` (largest total with ``maximize``, else smallest). No gradient."""
    if scores.ndim != 3 or scores.shape[1] != scores.shape[2]:
        raise ValueError(f"linear_assignment needs (B, n, n) square matrices, got {tuple(scores.shape)}")
    cost = scores.detach().to(torch.float64)
    if maximize:
        cost = -cost
    if not torch.isfinite(cost).all():
        raise ValueError("linear_assignment: the scores must be finite")
    B, n = cost.shape[0], cost.shape[1]
    device = cost.device
    if n == 0 or B == 0:
        return torch.zeros(B, n, dtype=torch.long, device=device)
    # Index 0 is the virtual column / row of the textbook algorithm; rows and columns are 1..n.
    u = torch.zeros(B, n + 1, dtype=torch.float64, device=device)  # row potentials
    v = torch.zeros(B, n + 1, dtype=torch.float64, device=device)  # column potentials
    p = torch.zeros(B, n + 1, dtype=torch.long, device=device)  # p[j]: row matched to column j (0: none)
    way = torch.zeros(B, n + 1, dtype=torch.long, device=device)  # previous column on the shortest path
    batch = torch.arange(B, device=device)
    padded = torch.cat([cost.new_zeros(B, 1, n), cost], dim=1)  # padded[b, i] is row i (1-based)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=device)
    for i in range(1, n + 1):
        p[:, 0] = i
        j0 = torch.zeros(B, dtype=torch.long, device=device)
        minv = torch.full((B, n + 1), float("inf"), dtype=torch.float64, device=device)
        used = torch.zeros(B, n + 1, dtype=torch.bool, device=device)
        active = torch.ones(B, dtype=torch.bool, device=device)
        # Row i's augmenting path visits at most i columns: i - 1 are matched, the i-th is free.
        for _ in range(i):
            used[batch, j0] |= active
            i0 = p[batch, j0]
            reduced = padded[batch, i0] - u[batch, i0].unsqueeze(1) - v[:, 1:]
            free = ~used[:, 1:]
            better = free & (reduced < minv[:, 1:]) & active.unsqueeze(1)
            minv[:, 1:] = torch.where(better, reduced, minv[:, 1:])
            way[:, 1:] = torch.where(better, j0.unsqueeze(1), way[:, 1:])
            delta, j1 = torch.where(free, minv[:, 1:], inf).min(dim=1)
            delta = torch.where(active, delta, torch.zeros_like(delta))
            # Shift the potentials: matched rows up, visited columns down, the frontier's slack down.
            u.scatter_add_(1, p, torch.where(used, delta.unsqueeze(1), torch.zeros_like(u)))
            v -= torch.where(used, delta.unsqueeze(1), torch.zeros_like(v))
            minv -= torch.where(~used, delta.unsqueeze(1), torch.zeros_like(minv))
            j0 = torch.where(active, j1 + 1, j0)
            active = active & (p[batch, j0] != 0)
        # Flip the matches along the path back to column 0.
        for _ in range(i):
            moving = j0 != 0
            j1 = way[batch, j0]
            p[batch, j0] = torch.where(moving, p[batch, j1], p[batch, j0])
            j0 = torch.where(moving, j1, j0)
    perm = torch.empty(B, n, dtype=torch.long, device=device)
    perm.scatter_(1, p[:, 1:] - 1, torch.arange(n, device=device).expand(B, n).contiguous())
    return perm


def permutation_matrix(perm: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(B, n)`` permutations -> ``(B, n, n)`` 0/1 matrices with ``m[b, i, perm[b, i]] = 1``."""
    n = perm.shape[-1]
    return torch.zeros(*perm.shape, n, dtype=dtype, device=perm.device).scatter_(-1, perm.unsqueeze(-1), 1.0)
