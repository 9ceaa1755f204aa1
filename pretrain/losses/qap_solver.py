"""A batched solver of Lawler's quadratic assignment problem, on the training device.

Problem, per group g of n nodes: over permutation matrices v (n x n), maximise

    score(v) = sum_ia c^v[i,a] v[i,a] + sum_{(i,a) != (j,b)} K[(i,a),(j,b)] v[i,a] v[j,b]

with x = vec(v) (row-major: index i * n + a) and K a dense (n^2, n^2) affinity
whose diagonal is c^v: score(v) = x^T K x. A training step solves hundreds of
16-node problems twice (the forward and the blackbox backward), so the solver is
built from fixed-size batched tensor operations, the same sequence for every
group, with no host round trip and no loop over groups:

1. a continuous relaxation for a fixed number of iterations: reweighted random
   walks (RRWM, Cho, Lee and Lee 2010) or spectral matching (the leading
   eigenvector by power iteration, Leordeanu and Hebert 2005), both on a
   non-negative copy of K that has the same optimum;
2. rounding to the permutation that maximises the linear assignment of the
   relaxed solution, exactly (``pretrain.losses.assignment``);
3. a fixed number of best-improvement passes over all n(n-1)/2 swaps of two
   nodes' partners, on the true score (a discrete polish the relaxations need:
   their rounding ignores the quadratic term), from the relaxation's rounding
   and, with ``multi_start``, from two more roundings (the vertex costs alone,
   and the score linearised at the uniform point); the best of them is kept.

Everything is deterministic: the same K gives the same permutation on every
call, which the blackbox gradient needs (the backward re-solves with shifted
costs and must differ from the forward only by the shift).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from pretrain.losses.assignment import linear_assignment


@dataclass
class QAPSolver:
    """Settings of :func:`solve_qap`; one object serves the forward and the backward solve."""

    relaxation: Literal["rrwm", "spectral"] = "rrwm"  # continuous relaxation before the rounding
    iterations: int = 30  # relaxation iterations (fixed: every group runs the same number)
    swap_passes: int = 4  # best-improvement passes over all pair swaps after the rounding; 0: none
    rrwm_alpha: float = 0.2  # RRWM: weight of the random walk against the Sinkhorn-reweighted jump
    rrwm_beta: float = 30.0  # RRWM: inflation of the reweighting, exp(beta * x / max x)
    sinkhorn_iterations: int = 10  # RRWM: row/column normalisation rounds of the reweighted jump
    multi_start: bool = True  # also polish the roundings of the vertex costs and of the linearised score; keep the best

    def __post_init__(self) -> None:
        if self.relaxation not in ("rrwm", "spectral"):
            raise ValueError(f"objective.solver.relaxation must be 'rrwm' or 'spectral', got {self.relaxation!r}")
        for name in ("iterations", "swap_passes", "sinkhorn_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"objective.solver.{name} must be an integer >= 0, got {value!r}")
        if not 0.0 <= self.rrwm_alpha <= 1.0:
            raise ValueError(f"objective.solver.rrwm_alpha must lie in [0, 1], got {self.rrwm_alpha}")
        if self.rrwm_beta <= 0:
            raise ValueError(f"objective.solver.rrwm_beta must be positive, got {self.rrwm_beta}")


def affinity_matrix(vertex: torch.Tensor, edge: torch.Tensor | None) -> torch.Tensor:
    """``K`` (G, n^2, n^2): ``edge`` off the diagonal (zeros for ``None``), ``vertex`` (G, n, n) on it."""
    G, n, _ = vertex.shape
    K = vertex.new_zeros(G, n * n, n * n) if edge is None else edge.clone()
    K.diagonal(dim1=1, dim2=2).copy_(vertex.reshape(G, n * n))
    return K


def qap_score(K: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x^T K x`` (G,) of the permutations ``perm`` (G, ..., n): any leading candidate axes."""
    n = perm.shape[-1]
    rows = torch.arange(n, device=perm.device) * n + perm  # (G, ..., n): the entries x[i * n + perm_i] = 1
    flat = rows.unsqueeze(-1) * (n * n) + rows.unsqueeze(-2)  # (G, ..., n, n) indices into K flattened
    G = K.shape[0]
    picked = K.reshape(G, -1).gather(1, flat.reshape(G, -1)).reshape(flat.shape)
    return picked.sum(dim=(-1, -2))


def _compatible(n: int, device: torch.device) -> torch.Tensor:
    """(n^2, n^2) mask of the entries a permutation can reach: i != j and a != b, or the diagonal."""
    idx = torch.arange(n * n, device=device)
    i, a = idx // n, idx % n
    off = (i[:, None] != i[None, :]) & (a[:, None] != a[None, :])
    return off | torch.eye(n * n, dtype=torch.bool, device=device)


def _nonnegative(K: torch.Tensor, n: int) -> torch.Tensor:
    """K minus its smallest reachable entry on every reachable entry, 0 elsewhere.

    A permutation's x x^T has exactly n^2 ones, all on reachable entries, so the
    shift lowers every permutation's score by the same n^2 * min: same optimum,
    and the random walks of the relaxations need non-negative weights.
    """
    mask = _compatible(n, K.device)
    low = torch.where(mask, K, torch.full_like(K, float("inf"))).amin(dim=(1, 2), keepdim=True)
    return torch.where(mask, K - low, torch.zeros_like(K))


def _sinkhorn(y: torch.Tensor, rounds: int) -> torch.Tensor:
    for _ in range(rounds):
        y = y / y.sum(dim=2, keepdim=True).clamp_min(1e-30)
        y = y / y.sum(dim=1, keepdim=True).clamp_min(1e-30)
    return y


def _rrwm(M: torch.Tensor, n: int, s: QAPSolver) -> torch.Tensor:
    G = M.shape[0]
    P = M / M.sum(dim=2).amax(dim=1).clamp_min(1e-30)[:, None, None]
    x = M.new_full((G, n * n), 1.0 / (n * n))
    for _ in range(s.iterations):
        walk = torch.bmm(P, x.unsqueeze(2)).squeeze(2)
        jump = torch.exp(s.rrwm_beta * walk / walk.amax(dim=1, keepdim=True).clamp_min(1e-30))
        jump = _sinkhorn(jump.reshape(G, n, n), s.sinkhorn_iterations).reshape(G, n * n)
        jump = jump / jump.sum(dim=1, keepdim=True)
        x = s.rrwm_alpha * walk + (1 - s.rrwm_alpha) * jump
        x = x / x.sum(dim=1, keepdim=True).clamp_min(1e-30)
    return x.reshape(G, n, n)


def _spectral(M: torch.Tensor, n: int, s: QAPSolver) -> torch.Tensor:
    G = M.shape[0]
    x = M.new_full((G, n * n), 1.0 / n)
    for _ in range(s.iterations):
        x = torch.bmm(M, x.unsqueeze(2)).squeeze(2)
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return x.reshape(G, n, n)


def _swap_pairs(n: int, device: torch.device) -> torch.Tensor:
    k, l = torch.triu_indices(n, n, offset=1, device=device)
    return torch.stack([k, l], dim=1)  # (n(n-1)/2, 2)


def polish_by_swaps(K: torch.Tensor, perm: torch.Tensor, passes: int) -> torch.Tensor:
    """``passes`` rounds of: apply the best of all pair swaps where it raises the score."""
    G, n = perm.shape
    if passes == 0 or n < 2:
        return perm
    pairs = _swap_pairs(n, perm.device)
    C = pairs.shape[0]
    groups = torch.arange(G, device=perm.device)[:, None]
    cand = torch.arange(C, device=perm.device)[None, :]
    first, second = pairs[:, 0][None, :], pairs[:, 1][None, :]
    current = qap_score(K, perm)
    for _ in range(passes):
        candidates = perm.unsqueeze(1).repeat(1, C, 1)  # (G, C, n)
        candidates[groups, cand, first] = perm[:, pairs[:, 1]]
        candidates[groups, cand, second] = perm[:, pairs[:, 0]]
        scores = qap_score(K, candidates)  # (G, C)
        best, which = scores.max(dim=1)
        # a relative margin: a swap that only rounding calls better must not flip the answer
        improve = best > current + 1e-9 * current.abs().clamp_min(1.0)
        chosen = candidates[groups.squeeze(1), which]
        perm = torch.where(improve[:, None], chosen, perm)
        current = torch.where(improve, best, current)
    return perm


@torch.no_grad()
def solve_qap(vertex: torch.Tensor, edge: torch.Tensor | None, solver: QAPSolver) -> torch.Tensor:
    """The permutations (G, n) maximising ``score`` for ``vertex`` (G, n, n) and ``edge`` (G, n^2, n^2).

    ``edge=None`` is the linear assignment of ``vertex`` alone, solved exactly.
    """
    if edge is None:
        return linear_assignment(vertex)
    n = vertex.shape[1]
    K = affinity_matrix(vertex.detach().double(), edge.detach().double())
    M = _nonnegative(K, n)
    relaxed = _rrwm(M, n, solver) if solver.relaxation == "rrwm" else _spectral(M, n, solver)
    if not solver.multi_start:
        return polish_by_swaps(K, linear_assignment(relaxed), solver.swap_passes)
    G = K.shape[0]
    # Three roundings, each polished, the best kept: the relaxation's; the vertex costs' alone; and the
    # linearisation of the score at the uniform doubly stochastic point (each pair's total affinity).
    scores = torch.cat([relaxed, vertex.detach().double(), K.sum(dim=2).reshape(G, n, n)])
    K3 = K.repeat(3, 1, 1)
    perms = polish_by_swaps(K3, linear_assignment(scores), solver.swap_passes)
    best = qap_score(K3, perms).reshape(3, G).argmax(dim=0)  # first of equals: deterministic
    return perms.reshape(3, G, n)[best, torch.arange(G, device=K.device)]
