"""The parametric scaling law L(N, D) = E + A / N^alpha + B / D^beta, fitted as Chinchilla's approach 3 was
replicated by Besiroglu et al. (2024): Huber loss (delta 1e-3) between log L and the log of the law, written
as a log-sum-exp of (a - alpha ln N, b - beta ln D, e) with A = e^a, B = e^b, E = e^e, minimised by L-BFGS from
every point of a grid of starts; bootstrap resamples of the points give intervals on every parameter and
prediction.

Compute-optimal allocation: with C = f(N) x D, f the model's FLOPs per sample (f = k N^gamma, fitted to the
runs; 6 N for language models), N*(C) minimises L(N, C / f(N)).
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from threadpoolctl import threadpool_limits

NAMES = ("E", "A", "B", "alpha", "beta")
# Besiroglu et al.'s grid of starting points: alpha, beta, e, a, b
DEFAULT_GRID = {"alpha": [0.0, 0.5, 1.0, 1.5, 2.0], "beta": [0.0, 0.5, 1.0, 1.5, 2.0],
                "e": [-1.0, -0.5, 0.0, 0.5, 1.0], "a": [0, 5, 10, 15, 20, 25], "b": [0, 5, 10, 15, 20, 25]}
COARSE_GRID = {"alpha": [0.25, 0.75], "beta": [0.25, 0.75], "e": [-1.0, 0.5], "a": [2, 8, 15], "b": [2, 8, 15]}


def grid_starts(grid: dict[str, list[float]]) -> np.ndarray:
    """(starts, 5) as (a, b, e, alpha, beta)."""
    combos = itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])
    return np.array(list(combos), dtype=float)


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """Sum of Huber losses and its gradient in theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    r = top + np.log(total) - log_l
    weights /= total
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
    slope = np.where(small, r, delta * np.sign(r))
    g1, g2, g3 = (slope * weights).reshape(3, -1).sum(axis=1)
    grad = np.array([g1, g2, g3, -(slope * weights[0] * log_n).sum(), -(slope * weights[1] * log_d).sum()])
    return loss, grad


# (a, b, e, alpha, beta): wide enough for any published law (Chinchilla: a 6.2, b 7.7, alpha 0.35); without
# bounds, runs whose loss hardly depends on N send A / N^alpha to inf / inf (seen on 9 CPU runs: alpha 63)
BOUNDS = [(-20.0, 80.0), (-20.0, 80.0), (-10.0, 10.0), (0.0, 4.0), (0.0, 4.0)]
_BOUND_NAMES = ("A", "B", "E", "alpha", "beta")


def _minimise(start: np.ndarray, data: tuple, delta: float):
    start = np.clip(start, [lo for lo, _ in BOUNDS], [hi for _, hi in BOUNDS])
    res = minimize(_objective, start, args=(*data, delta), jac=True, method="L-BFGS-B", bounds=BOUNDS,
                   options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-10})
    return res.fun, res.x


def at_bounds(theta: np.ndarray, tol: float = 1e-6) -> list[str]:
    """The parameters the fit pushed to a bound: the runs do not identify them."""
    return [name for name, value, (lo, hi) in zip(_BOUND_NAMES, theta, BOUNDS) if value - lo < tol or hi - value < tol]


def _best(starts: np.ndarray, data: tuple, delta: float) -> tuple[float, np.ndarray]:
    best = (np.inf, starts[0])
    for start in starts:
        value, theta = _minimise(start, data, delta)
        if np.isfinite(value) and value < best[0]:
            best = (value, theta)
    return best


def to_params(theta: np.ndarray) -> dict[str, float]:
    a, b, e, alpha, beta = theta
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": float(alpha),
            "beta": float(beta)}


def predict(params: dict[str, float], n, d):
    n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
    return params["E"] + params["A"] / n ** params["alpha"] + params["B"] / d ** params["beta"]


@dataclass
class LawFit:
    params: dict[str, float]
    samples: list[dict[str, float]] = field(default_factory=list)  # one per bootstrap resample
    huber: float = 0.0
    points: int = 0
    delta: float = 1e-3
    unidentified: list[str] = field(default_factory=list)  # parameters at a bound of the search

    def interval(self, name: str, level: float = 0.95) -> tuple[float, float]:
        values = np.array([s[name] for s in self.samples])
        q = (1 - level) / 2
        return float(np.quantile(values, q)), float(np.quantile(values, 1 - q))

    def predict(self, n, d, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(estimate, low, high) of L at (n, d)."""
        est = predict(self.params, n, d)
        if not self.samples:
            return est, est, est
        draws = np.stack([predict(s, n, d) for s in self.samples])
        q = (1 - level) / 2
        return est, np.quantile(draws, q, axis=0), np.quantile(draws, 1 - q, axis=0)

    def to_dict(self, level: float = 0.95) -> dict:
        out = {"params": self.params, "huber_loss": self.huber, "points": self.points, "delta": self.delta,
               "bootstrap": len(self.samples), "level": level, "unidentified": self.unidentified}
        if self.samples:
            out["intervals"] = {k: list(self.interval(k, level)) for k in NAMES}
        out["samples"] = self.samples
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "LawFit":
        return cls(dict(data["params"]), [dict(s) for s in data.get("samples", [])], data.get("huber_loss", 0.0),
                   data.get("points", 0), data.get("delta", 1e-3), list(data.get("unidentified", [])))


def one_blas_thread(fn):
    """Run ``fn`` with BLAS / LAPACK on one thread: the fits' tiny matrix calls (L-BFGS-B, polyfit) spin many
    threads against each other and against any training job on the machine (the Chinchilla refit: 72 s ->
    2.7 s on 2 busy cores)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with threadpool_limits(1):
            return fn(*args, **kwargs)

    return wrapper


@one_blas_thread
def fit_law(n, d, loss, *, delta: float = 1e-3, grid: dict[str, list[float]] | None = None, bootstrap: int = 200,
            seed: int = 0, restarts: int = 4) -> LawFit:
    """Fit L(N, D) to the points; ``bootstrap`` resamples (with replacement) each refit from the full fit's
    optimum and the ``restarts`` grid starts best on that resample."""
    n, d, loss = (np.asarray(x, dtype=float) for x in (n, d, loss))
    if not (n.shape == d.shape == loss.shape) or n.ndim != 1:
        raise ValueError("N, D and loss must be 1-D arrays of one length")
    if len(n) < 6:
        raise ValueError(f"the law has 5 parameters: fitting it needs at least 6 points, got {len(n)}")
    if np.any(n <= 0) or np.any(d <= 0) or np.any(loss <= 0) or not np.all(np.isfinite(n * d * loss)):
        raise ValueError("N, D and loss must be finite and positive")
    data = (np.log(n), np.log(d), np.log(loss))
    starts = grid_starts(grid or DEFAULT_GRID)
    value, theta = _best(starts, data, delta)
    fit = LawFit(to_params(theta), huber=float(value), points=len(n), delta=delta, unidentified=at_bounds(theta))
    rng = np.random.default_rng(seed)
    for _ in range(bootstrap):
        idx = rng.integers(0, len(n), len(n))
        sample = tuple(x[idx] for x in data)
        ranked = sorted(starts, key=lambda s: _objective(s, *sample, delta)[0])[:restarts]
        _, theta_b = _best(np.vstack([theta, *ranked]), sample, delta)
        fit.samples.append(to_params(theta_b))
    return fit


def flops_model(n, flops_per_sample) -> tuple[float, float]:
    """(k, gamma) of flops_per_sample = k N^gamma by least squares in log-log (one size: gamma 1)."""
    n, f = np.log(np.asarray(n, dtype=float)), np.log(np.asarray(flops_per_sample, dtype=float))
    if len(np.unique(n)) < 2:
        return float(np.exp(np.mean(f - n))), 1.0
    gamma, log_k = np.polyfit(n, f, 1)
    return float(np.exp(log_k)), float(gamma)


def compute_optimal(params: dict[str, float], compute: float, k: float, gamma: float) -> dict[str, float]:
    """N*, D* and L* for budget ``compute`` with C = k N^gamma D."""
    def loss_at(log_n: float) -> float:
        d = compute / (k * np.exp(gamma * log_n))
        return float(predict(params, np.exp(log_n), d))

    lo, hi = np.log(1e2), np.log(1e15)
    res = minimize_scalar(loss_at, bounds=(lo, hi), method="bounded", options={"xatol": 1e-8, "maxiter": 500})
    n_opt = float(np.exp(res.x))
    out = {"N": n_opt, "D": compute / (k * n_opt ** gamma), "loss": float(res.fun)}
    if min(res.x - lo, hi - res.x) < 1e-3:
        out["at_search_bound"] = True  # the law has no interior optimum: it keeps improving towards N = 1e2 / 1e15
    return out


def optimal_with_intervals(fit: LawFit, compute: float, k: float, gamma: float, level: float = 0.95) -> dict:
    """compute_optimal of the estimate, with bootstrap intervals on N*, D*, L*."""
    est = compute_optimal(fit.params, compute, k, gamma)
    out = {"compute": compute, **{key: {"estimate": est[key]} for key in ("N", "D", "loss")},
           "at_search_bound": bool(est.get("at_search_bound"))}
    if fit.samples:
        draws = [compute_optimal(s, compute, k, gamma) for s in fit.samples]
        q = (1 - level) / 2
        for key in ("N", "D", "loss"):
            values = np.array([dr[key] for dr in draws])
            out[key]["interval"] = [float(np.quantile(values, q)), float(np.quantile(values, 1 - q))]
    return out
