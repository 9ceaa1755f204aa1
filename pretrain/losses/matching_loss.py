"""The Hamming loss of a combinatorial matching to the identity, with the blackbox gradient.

The matching v_hat = argmax_v score(c; v) (``pretrain.losses.qap_solver``) is
piecewise constant in its costs c, so autograd alone gives no gradient. The
blackbox estimator (Vlastelica et al. 2020; in graph matching, Rolinek et al.
2020; I-MLE, Niepert et al. 2021, gives the same form with perturbed costs)
re-solves once with the vertex costs moved against the loss gradient,

    c'^v = c^v - lambda * dL/dv_hat,        v_lambda = argmax_v score(c'; v),

and uses the difference of the two solutions as the gradient of a linear
interpolation of L:

    dL/dc^v = (v_hat - v_lambda) / lambda,
    dL/dK[(i,a),(j,b)] = (v_hat[i,a] v_hat[j,b] - v_lambda[i,a] v_lambda[j,b]) / lambda.

(Signs for a maximisation: raising c^v where v_hat matches wrongly would keep
the wrong match.) For the Hamming loss to the identity, L = sum v (1 - I) +
I (1 - v), dL/dv = 1 - 2I for every v. The loss is per group, so lambda acts on
each group's own solve whatever weight the caller gives the group; the caller
averages.
"""
from __future__ import annotations

from typing import Any

import torch

from pretrain.losses.assignment import permutation_matrix
from pretrain.losses.qap_solver import QAPSolver, solve_qap


def hamming_to_identity(perm: torch.Tensor) -> torch.Tensor:
    """Hamming distance (G,) between permutation matrices and the identity: twice the misplaced rows."""
    n = perm.shape[-1]
    return 2.0 * (perm != torch.arange(n, device=perm.device)).sum(dim=-1).to(torch.float32)


class _BlackboxHamming(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, vertex: torch.Tensor, edge: torch.Tensor | None, solver: QAPSolver,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        perm = solve_qap(vertex, edge, solver)
        ctx.save_for_backward(vertex, edge if edge is not None else vertex.new_empty(0), perm)
        ctx.solver, ctx.lam, ctx.linear = solver, lam, edge is None
        ctx.mark_non_differentiable(perm)
        return hamming_to_identity(perm).to(vertex.dtype), perm

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_perm: torch.Tensor) -> tuple:
        vertex, edge, perm = ctx.saved_tensors
        edge = None if ctx.linear else edge
        n = vertex.shape[-1]
        eye = torch.eye(n, dtype=vertex.dtype, device=vertex.device)
        shifted = vertex - ctx.lam * (1.0 - 2.0 * eye)  # c^v - lambda * dL/dv
        perm_lam = solve_qap(shifted, edge, ctx.solver)
        v_hat, v_lam = permutation_matrix(perm, vertex.dtype), permutation_matrix(perm_lam, vertex.dtype)
        scale = (grad_loss / ctx.lam).to(vertex.dtype)
        grad_vertex = scale[:, None, None] * (v_hat - v_lam)
        grad_edge = None
        if edge is not None and ctx.needs_input_grad[1]:
            x_hat, x_lam = v_hat.flatten(1), v_lam.flatten(1)
            outer = x_hat.unsqueeze(2) * x_hat.unsqueeze(1) - x_lam.unsqueeze(2) * x_lam.unsqueeze(1)
            grad_edge = scale[:, None, None] * outer
            grad_edge.diagonal(dim1=1, dim2=2).zero_()  # the diagonal of K is c^v, which got its share
        return grad_vertex, grad_edge, None, None


def blackbox_matching_loss(vertex: torch.Tensor, edge: torch.Tensor | None, solver: QAPSolver,
                           lam: float = 80.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group Hamming loss (G,) of the QAP matching of ``vertex`` (G, n, n) and ``edge`` (G, n^2, n^2)
    (``None``: linear assignment only) to the identity, and the matching itself (G, n)."""
    if lam <= 0:
        raise ValueError(f"blackbox lambda must be positive, got {lam}")
    return _BlackboxHamming.apply(vertex, edge, solver, lam)
