"""``pretrain bench lvm-solver``: how good and how fast LVM-Med's batched QAP solver is.

Three questions, one JSON:

- **Optimality**: on instances built like a training step's (two views'
  random node embeddings, their cosine kNN graphs, vertex and edge cosines,
  Gumbel noise) and on dense uniform ones (the hard case), the solver's score
  against the exact optimum by enumeration for n <= 8, and at n = 16 against a
  much stronger search (many random restarts, each polished by swaps to a local
  optimum). The linear assignment of the vertex costs alone and the solver
  without its swap polish stand beside it.
- **Planted matchings**: two noisy copies of the same embeddings in a random
  order: how often the solver recovers the order, against the linear
  assignment, and how often its score is at least the planted matching's (when
  it is, a miss is the model's, not the solver's).
- **Cost**: a whole training step (encoder, affinities, both solves,
  backward) and the two solves alone against the batch size; per-sample time
  should stay flat (linear growth), since groups are independent.
"""
from __future__ import annotations

import itertools
import math
import statistics
import time
from typing import Any

import numpy as np
import torch

from pretrain.losses.assignment import linear_assignment
from pretrain.tools.bench.common import recorded_path
from pretrain.losses.graph_affinity import edge_affinity, edge_mask, knn_adjacency, vertex_cosine
from pretrain.losses.qap_solver import QAPSolver, affinity_matrix, polish_by_swaps, qap_score, solve_qap


def training_like(G: int, n: int, g: torch.Generator, gumbel: float = 1.0, dim: int = 32) -> tuple:
    """Unrelated random embeddings of two views, as at initialisation, with the training step's noise."""
    zs, zt = torch.randn(G, n, dim, generator=g), torch.randn(G, n, dim, generator=g)
    mask = edge_mask(knn_adjacency(zs, min(5, n - 1)), knn_adjacency(zt, min(5, n - 1)))
    noise = torch.distributions.Gumbel(0.0, 1.0)
    vertex = vertex_cosine(zs, zt) + gumbel * noise.sample((G, n, n))
    e = noise.sample((G, n * n, n * n))
    edge = edge_affinity(zs, zt, mask) + gumbel * mask * (e + e.transpose(1, 2)) / 2
    return vertex.double(), edge.double()


def dense_uniform(G: int, n: int, g: torch.Generator) -> tuple:
    vertex = torch.rand(G, n, n, generator=g, dtype=torch.float64) * 2 - 1
    edge = torch.rand(G, n * n, n * n, generator=g, dtype=torch.float64) * 2 - 1
    edge = (edge + edge.transpose(1, 2)) / 2
    edge[:, torch.arange(n * n), torch.arange(n * n)] = 0
    return vertex, edge


def exact_optimum(K: torch.Tensor, n: int, chunk: int = 5040) -> torch.Tensor:
    """The best score (G,) over all n! permutations."""
    perms = torch.tensor(list(itertools.permutations(range(n))))
    best = torch.full((K.shape[0],), -math.inf, dtype=K.dtype)
    for start in range(0, len(perms), chunk):
        part = perms[start:start + chunk].unsqueeze(0).expand(K.shape[0], -1, -1)
        best = torch.maximum(best, qap_score(K, part).max(dim=1).values)
    return best


def strong_search(K: torch.Tensor, start: torch.Tensor, restarts: int, passes: int, g: torch.Generator) -> torch.Tensor:
    """Best score over ``start`` and ``restarts`` random permutations, each polished to a local optimum
    (at most ``passes`` swap passes)."""
    G, n = start.shape
    starts = torch.stack([torch.randperm(n, generator=g) for _ in range(G * restarts)]).reshape(restarts, G, n)
    perms = torch.cat([start.unsqueeze(0), starts]).reshape(-1, n)
    Ks = K.repeat(restarts + 1, 1, 1)
    score = qap_score(Ks, perms)
    for _ in range(0, passes, 4):  # 4 passes at a time, until no start improves (a local optimum each)
        perms = polish_by_swaps(Ks, perms, 4)
        new = qap_score(Ks, perms)
        if not (new > score).any():
            break
        score = new
    return score.reshape(restarts + 1, G).max(dim=0).values


def _gap_summary(optimum: torch.Tensor, scores: dict[str, torch.Tensor]) -> dict[str, Any]:
    out = {}
    for name, got in scores.items():
        gap = (optimum - got) / optimum.abs().clamp_min(1e-12)
        out[name] = {"mean_gap": float(gap.mean()), "median_gap": float(gap.median()), "max_gap": float(gap.max()),
                     "optimal_fraction": float((got >= optimum - 1e-9 * optimum.abs().clamp_min(1)).double().mean())}
    return out


def _solver_scores(vertex: torch.Tensor, edge: torch.Tensor, solver: QAPSolver) -> dict[str, torch.Tensor]:
    K = affinity_matrix(vertex, edge)
    plain = QAPSolver(**{**vars(solver), "swap_passes": 0, "multi_start": False})
    return {"solver": qap_score(K, solve_qap(vertex, edge, solver)),
            "solver_without_polish": qap_score(K, solve_qap(vertex, edge, plain)),
            "linear_assignment_only": qap_score(K, linear_assignment(vertex))}


def optimality(solver: QAPSolver, sizes: list[int], instances: int, restarts: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rows = []
    for kind, make in (("training_like", training_like), ("dense_uniform", dense_uniform)):
        for n in sizes:
            vertex, edge = make(instances, n, g)
            K = affinity_matrix(vertex, edge)
            scores = _solver_scores(vertex, edge, solver)
            if n <= 8:
                reference, how = exact_optimum(K, n), "exact (enumeration)"
            else:
                start = solve_qap(vertex, edge, solver)
                reference = strong_search(K, start, restarts, passes=4 * n, g=g)
                how = f"best of the solver and {restarts} random restarts, each polished by {4 * n} swap passes"
            rows.append({"instances": kind, "n": n, "count": instances, "reference": how,
                         **_gap_summary(reference, scores)})
    return {"rows": rows}


def planted(solver: QAPSolver, n: int, sigmas: list[float], instances: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for sigma in sigmas:
        zs = torch.randn(instances, n, 32, generator=g)
        order = torch.stack([torch.randperm(n, generator=g) for _ in range(instances)])
        zt = zs.gather(1, order[:, :, None].expand(-1, -1, 32)) + sigma * torch.randn(instances, n, 32, generator=g)
        truth = torch.argsort(order, dim=1)
        vertex = vertex_cosine(zs, zt).double()
        edge = edge_affinity(zs, zt, edge_mask(knn_adjacency(zs, 5), knn_adjacency(zt, 5))).double()
        K = affinity_matrix(vertex, edge)
        perm, linear = solve_qap(vertex, edge, solver), linear_assignment(vertex)
        rows.append({
            "sigma": sigma, "count": instances,
            "recovered": float((perm == truth).all(1).double().mean()),
            "node_accuracy": float((perm == truth).double().mean()),
            "linear_recovered": float((linear == truth).all(1).double().mean()),
            "linear_node_accuracy": float((linear == truth).double().mean()),
            "score_at_least_planted": float((qap_score(K, perm) >= qap_score(K, truth) - 1e-9).double().mean()),
        })
    return {"n": n, "embedding_dim": 32, "knn": 5, "rows": rows}


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def step_cost(config: str, overrides: list[str], batch_sizes: list[int], repeats: int, seed: int) -> dict[str, Any]:
    """A training step's forward + backward (no optimizer), and the two solves alone, against the batch."""
    from pretrain.config import load_config
    from pretrain.objectives import build_objective

    rows = []
    for batch_size in batch_sizes:
        cfg = load_config(config, [*overrides, f"data.batch_size={batch_size}"])
        torch.manual_seed(seed)
        objective = build_objective(cfg).train()
        recipe, size = objective.data_recipe(), cfg.objective.views.global_size
        rng = np.random.default_rng(seed)
        shape = (cfg.model.in_chans, *[int(s * 1.25) for s in size])
        batch = recipe.collate([recipe.transform({"image": rng.normal(size=shape).astype(np.float32),
                                                  "__key__": f"s{i}", "__seed__": i}) for i in range(batch_size)])

        def step() -> None:
            objective.zero_grad(set_to_none=True)
            objective(batch)["loss"].backward()

        n = cfg.objective.group_size
        groups = batch_size // n
        g = torch.Generator().manual_seed(seed)
        vertex, edge = training_like(groups, n, g)
        solver = cfg.objective.solver
        eye = torch.eye(n, dtype=vertex.dtype)

        def solves() -> None:
            solve_qap(vertex, edge, solver)
            solve_qap(vertex - cfg.objective.blackbox_lambda * (1 - 2 * eye), edge, solver)

        step()  # warm-up
        solves()
        step_times, solve_times = _timed(step, repeats), _timed(solves, repeats)
        rows.append({"batch_size": batch_size, "groups": groups, "step_s": step_times, "solves_s": solve_times,
                     "step_ms_per_sample": 1e3 * statistics.median(step_times) / batch_size,
                     "solves_ms_per_group": 1e3 * statistics.median(solve_times) / groups})
    xs = np.array([r["batch_size"] for r in rows], dtype=float)
    fits = {}
    for key in ("step_s", "solves_s"):
        ys = np.array([statistics.median(r[key]) for r in rows])
        slope, intercept = np.polyfit(xs, ys, 1)
        pred = slope * xs + intercept
        r2 = 1 - ((ys - pred) ** 2).sum() / max(((ys - ys.mean()) ** 2).sum(), 1e-30)
        fits[key] = {"seconds_per_sample": float(slope), "intercept_s": float(intercept), "r_squared": float(r2)}
    return {"config": recorded_path(config), "overrides": overrides, "threads": torch.get_num_threads(), "rows": rows,
            "linear_fit": fits}


def run_lvm_solver_bench(*, config: str, overrides: list[str], sizes: list[int], instances: int, restarts: int,
                         sigmas: list[float], batch_sizes: list[int], repeats: int, seed: int = 0) -> dict[str, Any]:
    from pretrain.config import load_config

    solver = load_config(config, overrides).objective.solver
    return {"solver": vars(solver),
            "optimality": optimality(solver, sizes, instances, restarts, seed),
            "planted": planted(solver, 16, sigmas, instances, seed),
            "step_cost": step_cost(config, overrides, batch_sizes, repeats, seed)}


def print_lvm_solver_summary(result: dict[str, Any]) -> None:
    print("optimality (mean gap to the reference; fraction at the reference):")
    for row in result["optimality"]["rows"]:
        cells = "  ".join(f"{k}: {row[k]['mean_gap']:.2%} / {row[k]['optimal_fraction']:.0%}"
                          for k in ("solver", "solver_without_polish", "linear_assignment_only"))
        print(f"  {row['instances']:>14} n={row['n']:>2}  {cells}")
    print("planted matchings at n=16 (recovered: solver / linear assignment; solver score >= planted):")
    for row in result["planted"]["rows"]:
        print(f"  sigma {row['sigma']:.2f}: {row['recovered']:.0%} / {row['linear_recovered']:.0%}; "
              f"{row['score_at_least_planted']:.0%}")
    print("cost against the batch size (ms per sample: whole step | ms per group: both solves):")
    for row in result["step_cost"]["rows"]:
        print(f"  B={row['batch_size']:>4}: {row['step_ms_per_sample']:.1f} | {row['solves_ms_per_group']:.1f}")
    fit = result["step_cost"]["linear_fit"]
    print(f"  linear fit R^2: step {fit['step_s']['r_squared']:.4f}, solves {fit['solves_s']['r_squared']:.4f}")
