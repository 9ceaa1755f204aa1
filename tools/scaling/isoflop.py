"""Chinchilla's approach 2: per compute budget, a parabola of loss against ln N through the runs of that budget;
its minimum N*(C); then power laws N* = a C^p and D* = b C^q across budgets. Bootstrap resamples of the runs
within each budget give intervals (a budget of exactly three distinct sizes is interpolated, not fitted: its
parabola has no uncertainty of its own, say so rather than show an interval of zero width).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .law import flops_model, one_blas_thread


@dataclass
class Parabola:
    budget: float
    coef: tuple[float, float, float]  # loss = c0 + c1 x + c2 x^2, x = ln N
    points: int
    n_opt: float | None  # None when the parabola opens downwards (no minimum inside)
    loss_opt: float | None
    inside: bool  # the minimum lies within the sizes run at this budget


BUDGET_TOLERANCE = 0.25  # runs without a planned budget share one when their C is within e^0.25 = 1.28x


def group_by_budget(rows: list[dict], loss_key: str, tolerance: float = BUDGET_TOLERANCE) -> dict[float, list[dict]]:
    """Runs by planned budget; without one, by C: a run joins the first group whose smallest C is within
    ``tolerance`` (in ln C) of its own; a group is then named by its geometric-mean C."""
    groups: dict[float, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["C"]):
        if r.get(loss_key) is None:
            continue
        key = r.get("budget")
        if key is None:
            key = next((b for b in groups if abs(np.log(r["C"] / b)) < tolerance), r["C"])
        groups.setdefault(float(key), []).append(r)
    named = {}
    for key, runs in groups.items():
        planned = runs[0].get("budget") is not None
        named[key if planned else float(np.exp(np.mean([np.log(r["C"]) for r in runs])))] = runs
    return named


def fit_parabola(budget: float, n: np.ndarray, loss: np.ndarray) -> Parabola | None:
    x = np.log(n)
    if len(np.unique(x)) < 3:
        return None
    c2, c1, c0 = np.polyfit(x, loss, 2)
    if c2 <= 0:
        return Parabola(budget, (c0, c1, c2), len(n), None, None, False)
    x_opt = -c1 / (2 * c2)
    return Parabola(budget, (float(c0), float(c1), float(c2)), len(n), float(np.exp(x_opt)),
                    float(c0 + c1 * x_opt + c2 * x_opt ** 2), bool(x.min() <= x_opt <= x.max()))


def _power_law(c: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """(coefficient, exponent) of y = a C^p in log-log, or None with fewer than two budgets."""
    if len(c) < 2:
        return None
    p, log_a = np.polyfit(np.log(c), np.log(y), 1)
    return float(np.exp(log_a)), float(p)


def _optima(groups: dict[float, list[dict]], loss_key: str, k: float, gamma: float, rng=None):
    budgets, n_opt, parabolas = [], [], []
    for budget, runs in groups.items():
        idx = np.arange(len(runs)) if rng is None else rng.integers(0, len(runs), len(runs))
        n = np.array([runs[i]["N"] for i in idx], dtype=float)
        loss = np.array([runs[i][loss_key] for i in idx], dtype=float)
        par = fit_parabola(budget, n, loss)
        parabolas.append(par)
        if par is not None and par.n_opt is not None:
            budgets.append(budget)
            n_opt.append(par.n_opt)
    budgets, n_opt = np.array(budgets), np.array(n_opt)
    d_opt = budgets / (k * n_opt ** gamma) if len(budgets) else budgets
    return budgets, n_opt, d_opt, parabolas


@one_blas_thread
def isoflop_fit(rows: list[dict], loss_key: str, *, bootstrap: int = 200, seed: int = 0,
                level: float = 0.95) -> dict:
    """Parabolas per budget, N*(C) and D*(C) exponents with bootstrap intervals."""
    groups = group_by_budget(rows, loss_key)
    members = {budget: [r.get("run") for r in runs] for budget, runs in groups.items()}
    k, gamma = flops_model([r["N"] for r in rows], [r["flops_per_sample"] for r in rows])
    budgets, n_opt, d_opt, parabolas = _optima(groups, loss_key, k, gamma)
    out: dict = {"flops_model": {"k": k, "gamma": gamma}, "budgets": [], "N_opt": None, "D_opt": None}
    for par in parabolas:
        if par is None:
            continue
        out["budgets"].append({"budget": par.budget, "points": par.points, "runs": members[par.budget],
                               "coef": list(par.coef), "N_opt": par.n_opt,
                               "loss_opt": par.loss_opt, "minimum_inside": par.inside,
                               "D_opt": par.budget / (k * par.n_opt ** gamma) if par.n_opt else None})
    n_law, d_law = _power_law(budgets, n_opt), _power_law(budgets, d_opt)
    if n_law is None:
        out["note"] = "fewer than two budgets with a parabola minimum: no N*(C) law"
        return out
    out["N_opt"] = {"coefficient": n_law[0], "exponent": n_law[1]}
    out["D_opt"] = {"coefficient": d_law[0], "exponent": d_law[1]}
    interpolated = all(len({r["N"] for r in runs}) <= 3 for runs in groups.values())
    if interpolated:
        out["note"] = ("every budget has at most three sizes: each parabola interpolates its points, so the "
                       "resampling intervals are not given; the parametric fit's intervals apply")
        return out
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        b, n_b, d_b, _ = _optima(groups, loss_key, k, gamma, rng)
        nl, dl = _power_law(b, n_b), _power_law(b, d_b)
        if nl is not None:
            draws.append((nl[1], dl[1]))
    if draws:
        q = (1 - level) / 2
        arr = np.array(draws)
        out["N_opt"]["interval"] = [float(np.quantile(arr[:, 0], q)), float(np.quantile(arr[:, 0], 1 - q))]
        out["D_opt"]["interval"] = [float(np.quantile(arr[:, 1], q)), float(np.quantile(arr[:, 1], 1 - q))]
        out["bootstrap"] = len(draws)
    return out
