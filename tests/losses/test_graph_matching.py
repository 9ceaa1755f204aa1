"""LVM-Med's matching parts: exact batched assignment, the QAP solver, the blackbox gradient, the affinities."""
from __future__ import annotations

import itertools

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from pretrain.losses.assignment import linear_assignment, permutation_matrix
from pretrain.losses.graph_affinity import (cell_centres, edge_affinity, edge_mask, knn_adjacency, local_prior,
                                            nearest_cells_by_place, normalized_adjacency, vertex_cosine)
from pretrain.losses.matching_loss import blackbox_matching_loss, hamming_to_identity
from pretrain.losses.qap_solver import QAPSolver, affinity_matrix, qap_score, solve_qap
from pretrain.models.gcn import GCN


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_qap(G: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    vertex = torch.randn(G, n, n, generator=g, dtype=torch.float64)
    edge = torch.randn(G, n * n, n * n, generator=g, dtype=torch.float64)
    return vertex, (edge + edge.transpose(1, 2)) / 2


def _brute_force(K: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best permutation and score of every group, by enumeration."""
    perms = torch.tensor(list(itertools.permutations(range(n))))
    scores = qap_score(K, perms.unsqueeze(0).expand(K.shape[0], -1, -1))
    best = scores.argmax(dim=1)
    return perms[best], scores.max(dim=1).values


@pytest.mark.parametrize("n", [1, 2, 5, 16, 33])
def test_linear_assignment_is_optimal_like_scipy(n: int):
    g = _gen(n)
    scores = torch.randn(64, n, n, generator=g, dtype=torch.float64)
    if n == 5:  # integer costs: many ties, the optimum's value is still unique
        scores = torch.randint(0, 3, (64, n, n), generator=g).double()
    perm = linear_assignment(scores)
    for b in range(64):
        assert sorted(perm[b].tolist()) == list(range(n))
        rows, cols = linear_sum_assignment(scores[b].numpy(), maximize=True)
        assert scores[b, torch.arange(n), perm[b]].sum().item() == pytest.approx(scores[b].numpy()[rows, cols].sum(),
                                                                                  abs=1e-9)
    minimal = linear_assignment(scores, maximize=False)
    for b in range(8):
        rows, cols = linear_sum_assignment(scores[b].numpy())
        assert scores[b, torch.arange(n), minimal[b]].sum().item() == pytest.approx(scores[b].numpy()[rows, cols].sum())


def test_linear_assignment_refuses_bad_input():
    with pytest.raises(ValueError, match="square"):
        linear_assignment(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="finite"):
        linear_assignment(torch.full((1, 2, 2), float("nan")))


def test_the_linear_mode_is_scipys_assignment():
    g = _gen(1)
    vertex = torch.randn(32, 16, 16, generator=g)
    perm = solve_qap(vertex, None, QAPSolver())
    for b in range(32):
        _, cols = linear_sum_assignment(vertex[b].double().numpy(), maximize=True)
        assert perm[b].tolist() == cols.tolist()


@pytest.mark.parametrize("relaxation", ["rrwm", "spectral"])
def test_the_solver_returns_permutations_deterministically_and_near_the_optimum(relaxation: str):
    g = _gen(2)
    n = 6
    vertex, edge = _random_qap(64, n, g)
    solver = QAPSolver(relaxation=relaxation)
    perm = solve_qap(vertex, edge, solver)
    assert torch.equal(perm, solve_qap(vertex, edge, solver))
    assert (torch.sort(perm, dim=1).values == torch.arange(n)).all()
    matrix = permutation_matrix(perm)
    assert torch.equal(matrix.sum(1), torch.ones(64, n)) and torch.equal(matrix.sum(2), torch.ones(64, n))
    K = affinity_matrix(vertex, edge)
    _, optimum = _brute_force(K, n)
    got = qap_score(K, perm)
    # dense random instances are the hard case; measured: rrwm 3.1 %, spectral 3.9 % mean gap at n = 6
    gap = ((optimum - got) / optimum.abs()).mean().item()
    assert 0 <= gap < 0.08, gap
    # the polish and the extra starts only ever help
    plain = qap_score(K, solve_qap(vertex, edge, QAPSolver(relaxation=relaxation, swap_passes=0, multi_start=False)))
    assert (got >= plain - 1e-9).all() and got.mean() > plain.mean()


def _planted(G: int, n: int, sigma: float, g: torch.Generator):
    """Two noisy views of the same node embeddings in a random order: the matching to recover is known."""
    zs = torch.randn(G, n, 32, generator=g)
    order = torch.stack([torch.randperm(n, generator=g) for _ in range(G)])
    zt = zs.gather(1, order[:, :, None].expand(-1, -1, 32)) + sigma * torch.randn(G, n, 32, generator=g)
    mask = edge_mask(knn_adjacency(zs, 5), knn_adjacency(zt, 5))
    return vertex_cosine(zs, zt), edge_affinity(zs, zt, mask), torch.argsort(order, dim=1)


def test_planted_matchings_are_recovered():
    vertex, edge, truth = _planted(64, 16, 0.5, _gen(3))
    perm = solve_qap(vertex, edge, QAPSolver())
    assert (perm == truth).all(dim=1).float().mean() >= 0.95


def test_the_blackbox_gradient_is_its_formula_on_toy_instances():
    """n = 4: the forward and the shifted backward solve are checked against enumeration, and the
    gradients against (v_hat - v_lambda) / lambda and the outer-product difference, per group weight."""
    n, G, lam = 4, 16, 3.0  # a small lambda so that v_lambda is not always the identity
    vertex, edge = _random_qap(G, n, _gen(4))
    vertex, edge = vertex.float().requires_grad_(), edge.float().requires_grad_()
    solver = QAPSolver(swap_passes=8)
    loss, perm = blackbox_matching_loss(vertex, edge, solver, lam)
    weights = torch.linspace(0.5, 2.0, G)
    (loss * weights).sum().backward()

    eye = torch.eye(n)
    K = affinity_matrix(vertex.detach().double(), edge.detach().double())
    forward, _ = _brute_force(K, n)
    shifted = affinity_matrix((vertex.detach() - lam * (1 - 2 * eye)).double(), edge.detach().double())
    backward, _ = _brute_force(shifted, n)
    exact = (perm == forward).all(1)
    assert exact.float().mean() >= 0.75  # where the solver is exact, the formula must hold with the exact solutions
    v_hat, v_lam = permutation_matrix(forward), permutation_matrix(backward)
    want_vertex = weights[:, None, None] * (v_hat - v_lam) / lam
    x_hat, x_lam = v_hat.flatten(1), v_lam.flatten(1)
    want_edge = weights[:, None, None] * (x_hat[:, :, None] * x_hat[:, None] - x_lam[:, :, None] * x_lam[:, None]) / lam
    want_edge.diagonal(dim1=1, dim2=2).zero_()
    solved = exact & (solve_qap(vertex.detach() - lam * (1 - 2 * eye), edge.detach(), solver) == backward).all(1)
    assert solved.sum() >= G // 2
    assert torch.allclose(vertex.grad[solved], want_vertex[solved])
    assert torch.allclose(edge.grad[solved], want_edge[solved])
    assert torch.equal(loss.detach(), hamming_to_identity(perm))
    assert (vertex.grad.abs().sum((1, 2)) > 0).any()


def test_the_linear_blackbox_gradient_moves_costs_toward_the_identity():
    g = _gen(5)
    vertex = torch.randn(8, 5, 5, generator=g).requires_grad_()
    loss, perm = blackbox_matching_loss(vertex, None, QAPSolver(), lam=80.0)
    loss.sum().backward()
    v_hat = permutation_matrix(perm)
    # lambda = 80 dwarfs the costs: v_lambda is the identity, the gradient (v_hat - I) / lambda
    assert torch.allclose(vertex.grad, (v_hat - torch.eye(5)) / 80.0)
    step = vertex.detach() - 80.0 * vertex.grad  # one step of size lambda along the gradient
    # a step can make a single group's matching worse (it is combinatorial), the batch it improves
    assert hamming_to_identity(solve_qap(step, None, QAPSolver())).sum() < loss.detach().sum()


def test_knn_graphs_are_symmetric_without_self_loops_and_the_gcn_matrix_is_normalised():
    z = torch.randn(3, 16, 8, generator=_gen(6))
    adj = knn_adjacency(z, 5)
    assert torch.equal(adj, adj.transpose(1, 2))
    assert (adj.diagonal(dim1=1, dim2=2) == 0).all() and (adj.sum(-1) >= 5).all()
    prop = normalized_adjacency(adj)
    a = adj + torch.eye(16)
    d = a.sum(-1)
    assert torch.allclose(prop, a / (d[:, :, None] * d[:, None, :]).sqrt())


def test_gcn_layers_propagate_and_the_residual_skip_keeps_each_nodes_own_features():
    """Two layers against the formula written out; with the skip, a node's output keeps its input where the
    propagation alone would average it into its neighbourhood."""
    g = _gen(11)
    z = torch.randn(2, 16, 8, generator=g)
    prop = normalized_adjacency(knn_adjacency(z, 5))
    for residual in (False, True):
        gcn = GCN(8, 8, layers=2, residual=residual)
        w1, b1, w2, b2 = (p.detach() for p in gcn.parameters())
        h1 = torch.relu(prop @ z @ w1.T + b1 + (z if residual else 0))
        want = prop @ h1 @ w2.T + b2 + (h1 if residual else 0)
        assert torch.allclose(gcn(z, prop), want, atol=1e-5)
    widen = GCN(8, 12, layers=2, residual=True)  # no skip across a change of width
    w1, b1, w2, b2 = (p.detach() for p in widen.parameters())
    h1 = torch.relu(prop @ z @ w1.T + b1)
    assert torch.allclose(widen(z, prop), prop @ h1 @ w2.T + b2 + h1, atol=1e-5)
    plain = GCN(8, 8, layers=2)
    with torch.no_grad():  # zero weights: the plain GCN forgets the nodes, the residual one passes relu(z) through
        for p in [*gcn.parameters(), *plain.parameters()]:
            p.zero_()
    assert torch.equal(gcn(z, prop), torch.relu(z)) and not plain(z, prop).any()


def test_edge_affinity_is_the_cosine_of_node_differences_on_edges():
    g = _gen(7)
    zs, zt = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    adj_s, adj_t = knn_adjacency(zs, 2), knn_adjacency(zt, 2)
    K = edge_affinity(zs, zt, edge_mask(adj_s, adj_t))
    cos = torch.nn.functional.cosine_similarity
    for i, a, j, b in [(0, 1, 2, 3), (4, 5, 1, 0), (3, 3, 5, 2)]:
        want = cos(zs[1, i] - zs[1, j], zt[1, a] - zt[1, b], dim=0) * adj_s[1, i, j] * adj_t[1, a, b]
        assert K[1, i * 6 + a, j * 6 + b].item() == pytest.approx(want.item(), abs=1e-6)


def test_cell_centres_follow_the_crop_box_and_flips():
    boxes = torch.tensor([[[0.0, 0.5], [0.25, 0.75]]])  # rows 0..0.5, columns 0.25..0.75
    plain = cell_centres(boxes, torch.tensor([[False, False]]), (2, 2))[0]
    assert torch.allclose(plain, torch.tensor([[0.125, 0.375], [0.125, 0.625], [0.375, 0.375], [0.375, 0.625]]))
    flipped = cell_centres(boxes, torch.tensor([[False, True]]), (2, 2))[0]
    assert torch.allclose(flipped, plain[[1, 0, 3, 2]])


def test_nearest_cells_by_place_equal_the_exhaustive_search():
    g = _gen(9)
    G, n, grid = 2, 3, (3, 4)
    lo = torch.rand(G, n, 2, generator=g) * 0.5
    boxes = torch.stack([lo, lo + 0.2 + torch.rand(G, n, 2, generator=g) * 0.3], dim=-1)  # (G, n, dims, 2)
    flips = torch.rand(G, n, 2, generator=g) < 0.5
    points = torch.rand(G, n, 5, 2, generator=g)
    index, sq = nearest_cells_by_place(points, boxes, flips, grid)
    centres = cell_centres(boxes.flatten(0, 1), flips.flatten(0, 1), grid).reshape(G, n, 12, 2)
    dist = (points[:, :, None, :, None] - centres[:, None, :, None]).pow(2).sum(-1)  # (G, i, a, P, cells)
    assert torch.allclose(sq, dist.min(-1).values, atol=1e-6)
    assert torch.equal(index, dist.argmin(-1))


def _whole_views(G: int, n: int, flip_t: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    boxes = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).expand(G, n, 2, 2, 2)
    flips = torch.zeros(G, n, 2, 2, dtype=torch.bool)
    flips[:, :, 1, 1] = flip_t
    return boxes, flips


def test_the_local_prior_pairs_cells_by_place_and_by_feature():
    g = _gen(8)
    G, n, P, D = 1, 3, 16, 8
    ys = torch.randn(G, n, P, D, generator=g)
    # the same image in both views at the same place: every location pair is a cell with itself
    prior = local_prior(ys, ys, *_whole_views(G, n), (4, 4), gamma=6)
    assert torch.allclose(prior.diagonal(dim1=1, dim2=2), torch.ones(G, n))
    assert (prior - torch.diag_embed(prior.diagonal(dim1=1, dim2=2)) < 0.9).all()
    # the second view mirrored, and its flip recorded: location pairs still join a cell with itself
    yt = ys.reshape(G, n, 4, 4, D).flip(3).reshape(G, n, P, D)
    mirrored = local_prior(ys, yt, *_whole_views(G, n, flip_t=True), (4, 4), gamma=P)
    assert torch.allclose(mirrored.diagonal(dim1=1, dim2=2), torch.ones(G, n), atol=1e-6)
    # not told about the flip, location pairs join mirrored cells (cosine ~0), feature pairs still the same cell
    unmoved = local_prior(ys, yt, *_whole_views(G, n), (4, 4), gamma=P)
    assert (unmoved.diagonal(dim1=1, dim2=2) < 0.9).all()
