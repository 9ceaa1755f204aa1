"""The graphs and affinities of LVM-Med's matching (Nguyen et al. 2023, section 3), batched over groups.

Shapes: G groups of n images; ``z`` node embeddings (G, n, d); ``y`` feature-map
cells (G, n, P, D) with their centres ``pos`` (G, n, P, dims) in the original
image, as fractions of each axis. ``s`` is the first view, ``t`` the second;
node i of ``s`` and node i of ``t`` are the same image, so the target matching
is the identity.

Index choices (kNN neighbours, nearest cells) are made without gradient; the
cosines they pick carry it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_adjacency(z: torch.Tensor, k: int) -> torch.Tensor:
    """Symmetric 0/1 adjacency (G, n, n) joining each node to its ``k`` most cosine-similar others."""
    G, n, _ = z.shape
    k = min(k, n - 1)
    adj = z.new_zeros(G, n, n)
    if k <= 0:
        return adj
    zn = F.normalize(z.float(), dim=-1)
    sim = zn @ zn.transpose(1, 2)
    sim.diagonal(dim1=1, dim2=2).fill_(-float("inf"))
    adj.scatter_(2, sim.topk(k, dim=2).indices, 1.0)
    return torch.maximum(adj, adj.transpose(1, 2))


def normalized_adjacency(adj: torch.Tensor) -> torch.Tensor:
    """The GCN propagation matrix D^-1/2 (A + I) D^-1/2 (Kipf and Welling 2017)."""
    a = adj + torch.eye(adj.shape[-1], dtype=adj.dtype, device=adj.device)
    d = a.sum(dim=-1).rsqrt()
    return d.unsqueeze(-1) * a * d.unsqueeze(-2)


def vertex_cosine(zs: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
    """cos(z^s_i, z^t_a): (G, n, n)."""
    return F.normalize(zs, dim=-1) @ F.normalize(zt, dim=-1).transpose(1, 2)


def edge_mask(adj_s: torch.Tensor, adj_t: torch.Tensor) -> torch.Tensor:
    """1 at [(i,a),(j,b)] where (i,j) is an edge of G^s and (a,b) one of G^t: (G, n^2, n^2)."""
    G, n, _ = adj_s.shape
    return torch.einsum("gij,gab->giajb", adj_s, adj_t).reshape(G, n * n, n * n)


def edge_affinity(zs: torch.Tensor, zt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """K[(i,a),(j,b)] = cos(z^s_i - z^s_j, z^t_a - z^t_b) where ``mask`` (:func:`edge_mask`) is 1, else 0:
    (G, n^2, n^2), rows and columns indexed i * n + a."""
    G, n, d = zs.shape
    ds = F.normalize(zs.unsqueeze(2) - zs.unsqueeze(1), dim=-1, eps=1e-8).reshape(G, n * n, d)  # (i,j)
    dt = F.normalize(zt.unsqueeze(2) - zt.unsqueeze(1), dim=-1, eps=1e-8).reshape(G, n * n, d)  # (a,b)
    ce = ds @ dt.transpose(1, 2)  # (G, (i,j), (a,b))
    # (G, i, j, a, b) -> (G, i, a, j, b)
    return ce.reshape(G, n, n, n, n).permute(0, 1, 3, 2, 4).reshape(G, n * n, n * n) * mask


def cell_centres(boxes: torch.Tensor, flips: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """Centres (B, P, dims) of a view's grid cells in its source image, as fractions of each axis.

    ``boxes`` (B, dims, 2): the view's crop box (start, stop) per axis, as fractions; ``flips``
    (B, dims): 1 where the view was mirrored along that axis after the crop. Cells are row-major,
    as encoders emit them.
    """
    axes = [(torch.arange(g, dtype=boxes.dtype, device=boxes.device) + 0.5) / g for g in grid]
    frac = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(1, math.prod(grid), len(grid))
    frac = torch.where(flips.bool().unsqueeze(1), 1.0 - frac, frac)
    start, stop = boxes[..., 0].unsqueeze(1), boxes[..., 1].unsqueeze(1)
    return start + frac * (stop - start)


def _pairwise_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances (G, n*P, n*Q) between the rows of a (G, n*P, c) and b (G, n*Q, c)."""
    return ((a * a).sum(-1, keepdim=True) + (b * b).sum(-1).unsqueeze(-2) - 2.0 * a @ b.transpose(1, 2)).clamp_min(0)


@torch.no_grad()
def nearest_cells_by_place(points: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
                           grid: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """For points (G, n, P, dims) of every image i and the grid of every image a's view (its ``boxes``
    (G, n, dims, 2) and ``flips`` (G, n, dims)): the nearest cell of a's view to each point of i, and the
    squared distance to its centre, both (G, n_i, n_a, P).

    A view's cell centres form a regular grid inside its box, so the nearest centre is the nearest one
    along each axis: O(n^2 P) instead of comparing all n^2 P^2 pairs.
    """
    x = points.unsqueeze(2)  # (G, i, 1, P, dims)
    start, stop = boxes[..., 0][:, None, :, None], boxes[..., 1][:, None, :, None]  # (G, 1, a, 1, dims)
    flipped = flips.bool()[:, None, :, None]
    size = torch.tensor(grid, dtype=points.dtype, device=points.device)
    frac = (x - start) / (stop - start).clamp_min(1e-12)
    frac = torch.where(flipped, 1.0 - frac, frac)
    index = torch.minimum((frac * size).floor().clamp_min(0), size - 1)  # per axis
    centre = (index + 0.5) / size
    centre = start + torch.where(flipped, 1.0 - centre, centre) * (stop - start)
    sq = (x - centre).pow(2).sum(-1)
    strides = [math.prod(grid[k + 1:]) for k in range(len(grid))]
    flat = (index.long() * torch.tensor(strides, device=points.device)).sum(-1)  # row-major cell index
    return flat, sq


def _mean_of_best_pairs(cos: torch.Tensor, best: torch.Tensor, nearest: torch.Tensor, gamma: int) -> torch.Tensor:
    """cos (G, i, a, P, Q); per query cell p its partner ``nearest`` and how near, ``best`` (G, i, a, P):
    the mean cosine of the ``gamma`` nearest pairs, (G, i, a)."""
    keep = best.topk(gamma, dim=-1, largest=False).indices
    match = nearest.gather(-1, keep)
    rows = cos.gather(-2, keep.unsqueeze(-1).expand(*keep.shape, cos.shape[-1]))
    return rows.gather(-1, match.unsqueeze(-1)).squeeze(-1).mean(dim=-1)


def local_prior(ys: torch.Tensor, yt: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
                grid: tuple[int, ...], gamma: int) -> torch.Tensor:
    """c^lo (G, n, n): how well the cells of image i's view s agree with those of image a's view t.

    ``ys``, ``yt`` (G, n, P, D): the two views' feature maps on ``grid``; ``boxes`` (G, n, 2, dims, 2) and
    ``flips`` (G, n, 2, dims): where each view came from (:func:`cell_centres`). For each cell p of
    y^s_i: m(p) is the cell of y^t_a nearest in the original image and m'(p) the one nearest in feature
    space (L2); the ``gamma`` best pairs of each kind give two mean cosines, averaged. The same from t's
    cells to s's, and the two directions averaged (nearest-cell pairs are not symmetric).
    """
    G, n, P, D = ys.shape
    gamma = max(1, min(gamma, P))
    cos = (F.normalize(ys, dim=-1).reshape(G, n * P, D) @ F.normalize(yt, dim=-1).reshape(G, n * P, D).transpose(1, 2))
    cos = cos.reshape(G, n, P, n, P).permute(0, 1, 3, 2, 4)  # (G, i, a, p, q)
    with torch.no_grad():
        d_feat = _pairwise_sq(ys.detach().float().reshape(G, n * P, D), yt.detach().float().reshape(G, n * P, D))
        d_feat = d_feat.reshape(G, n, P, n, P).permute(0, 1, 3, 2, 4)
        boxes, flips = boxes.float(), flips.bool()
        centres = [cell_centres(boxes[:, :, v].flatten(0, 1), flips[:, :, v].flatten(0, 1), grid).reshape(G, n, P, -1)
                   for v in (0, 1)]
        loc_st = nearest_cells_by_place(centres[0], boxes[:, :, 1], flips[:, :, 1], grid)  # (G, i, a, P)
        loc_ts = nearest_cells_by_place(centres[1], boxes[:, :, 0], flips[:, :, 0], grid)  # (G, a, i, Q)
        loc_ts = tuple(t.transpose(1, 2) for t in loc_ts)  # (G, i, a, Q)
    feat_best, feat_nearest = d_feat.min(dim=-1)
    feat_best_t, feat_nearest_t = d_feat.min(dim=-2)
    cos_t = cos.transpose(-1, -2)
    forward = 0.5 * (_mean_of_best_pairs(cos, loc_st[1], loc_st[0], gamma)
                     + _mean_of_best_pairs(cos, feat_best, feat_nearest, gamma))
    backward = 0.5 * (_mean_of_best_pairs(cos_t, loc_ts[1], loc_ts[0], gamma)
                      + _mean_of_best_pairs(cos_t, feat_best_t, feat_nearest_t, gamma))
    return 0.5 * (forward + backward)
