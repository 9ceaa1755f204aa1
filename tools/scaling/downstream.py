"""Downstream metrics (kNN, linear-probe accuracy) against compute: a saturating power law
m(C) = m_inf - B C^(-c) (written B = e^b), least squares from a small grid of starts, bootstrap intervals."""
from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import minimize

from .law import one_blas_thread

NAMES = ("m_inf", "B", "c")


def _sse(theta: np.ndarray, log_c: np.ndarray, m: np.ndarray) -> float:
    m_inf, b, c = theta
    return float(np.sum((m_inf - np.exp(b - c * log_c) - m) ** 2))


def _fit(log_c: np.ndarray, m: np.ndarray) -> np.ndarray:
    best = (np.inf, None)
    for m_inf, c in itertools.product([m.max() + 0.02, m.max() + 0.1, 1.0], [0.05, 0.2, 0.5, 1.0]):
        b = np.log(max(m_inf - m.min(), 1e-6)) + c * log_c.min()  # the lowest-compute run on the curve
        res = minimize(_sse, np.array([m_inf, b, c]), args=(log_c, m), method="L-BFGS-B",
                       bounds=[(m.max(), 1.0), (None, None), (1e-4, 5.0)])
        if res.fun < best[0]:
            best = (res.fun, res.x)
    return best[1]


def _params(theta: np.ndarray) -> dict[str, float]:
    return {"m_inf": float(theta[0]), "B": float(np.exp(theta[1])), "c": float(theta[2])}


@one_blas_thread
def saturating_fit(compute, metric, *, bootstrap: int = 200, seed: int = 0, level: float = 0.95) -> dict:
    """Parameters, intervals and the curve's values at the observed compute range's ends."""
    c = np.asarray(compute, dtype=float)
    m = np.asarray(metric, dtype=float)
    if len(c) < 4:
        raise ValueError(f"a saturating law (3 parameters) needs at least 4 runs with the metric, got {len(c)}")
    log_c = np.log(c)
    theta = _fit(log_c, m)
    out = {"params": _params(theta), "points": int(len(c))}
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(c), len(c))
        if len(np.unique(log_c[idx])) < 3:
            continue
        draws.append(_params(_fit(log_c[idx], m[idx])))
    if draws:
        q = (1 - level) / 2
        out["intervals"] = {k: [float(np.quantile([d[k] for d in draws], q)),
                                float(np.quantile([d[k] for d in draws], 1 - q))] for k in NAMES}
        out["samples"] = draws
    return out


def saturating_predict(params: dict[str, float], compute) -> np.ndarray:
    return params["m_inf"] - params["B"] * np.asarray(compute, dtype=float) ** (-params["c"])
