"""The study's figures (matplotlib, PNG; also logged to TensorBoard): loss against compute with the fitted
compute-optimal frontier, IsoFLOP curves with their minima, predicted against observed, residuals."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .law import LawFit, compute_optimal, predict


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _frontier(fit: LawFit, c_grid: np.ndarray, k: float, gamma: float, level: float):
    est = np.array([compute_optimal(fit.params, c, k, gamma)["loss"] for c in c_grid])
    if not fit.samples:
        return est, est, est
    draws = np.array([[compute_optimal(s, c, k, gamma)["loss"] for c in c_grid] for s in fit.samples[:100]])
    q = (1 - level) / 2
    return est, np.quantile(draws, q, axis=0), np.quantile(draws, 1 - q, axis=0)


def make_plots(rows: list[dict], loss_key: str, fit: LawFit | None, isoflop: dict | None, out: Path,
               k: float, gamma: float, level: float = 0.95) -> list[Path]:
    """Write the PNGs under ``out``; returns their paths."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in rows if r.get(loss_key) is not None]
    c = np.array([r["C"] for r in rows], dtype=float)
    n = np.array([r["N"] for r in rows], dtype=float)
    d = np.array([r["D"] for r in rows], dtype=float)
    loss = np.array([r[loss_key] for r in rows], dtype=float)
    sizes = sorted(set(n))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    colour = {s: colours[i] for i, s in enumerate(sizes)}
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for s in sizes:
        sel = n == s
        ax.scatter(c[sel], loss[sel], color=colour[s], label=f"N = {s:,.0f}", zorder=3)
    if fit is not None:
        grid = np.geomspace(c.min() / 2, c.max() * 4, 40)
        est, lo, hi = _frontier(fit, grid, k, gamma, level)
        ax.plot(grid, est, "k-", label="compute-optimal L*(C), fit")
        ax.fill_between(grid, lo, hi, color="k", alpha=0.12, label=f"{level:.0%} bootstrap interval")
    _label(ax, "training compute C (FLOPs)", loss_key.replace("_", " "), "loss against compute")
    paths.append(_save(fig, out / "loss_vs_compute.png", plt))

    if isoflop and isoflop.get("budgets"):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        budgets = sorted({b["budget"] for b in isoflop["budgets"]})
        tones = plt.cm.plasma(np.linspace(0, 0.8, len(budgets)))
        for tone, b in zip(tones, budgets):
            entry = next(e for e in isoflop["budgets"] if e["budget"] == b)
            sel = np.array([r.get("run") in entry["runs"] for r in rows])
            ax.scatter(n[sel], loss[sel], color=tone, zorder=3, label=f"C = {b:.2g}")
            x = np.linspace(np.log(n[sel].min()) - 0.3, np.log(n[sel].max()) + 0.3, 50)
            c0, c1, c2 = entry["coef"]
            ax.plot(np.exp(x), c0 + c1 * x + c2 * x ** 2, color=tone, lw=1)
            if entry["N_opt"]:
                ax.plot([entry["N_opt"]], [entry["loss_opt"]], marker="*", ms=12, color=tone, mec="k")
        _label(ax, "non-embedding parameters N", loss_key.replace("_", " "), "IsoFLOP curves (star: parabola minimum)")
        paths.append(_save(fig, out / "isoflop.png", plt))

    if fit is not None:
        with np.errstate(all="ignore"):
            pred = predict(fit.params, n, d)
        if not np.all(np.isfinite(pred)):
            return paths  # a fit that overflowed has nothing to compare
        fig, ax = plt.subplots(figsize=(4.6, 4.2))
        ax.scatter(pred, loss, c=[colour[s] for s in n], zorder=3)
        lims = [min(pred.min(), loss.min()), max(pred.max(), loss.max())]
        ax.plot(lims, lims, "k--", lw=1)
        ax.set_xlabel("predicted L(N, D)")
        ax.set_ylabel("observed")
        ax.set_title("fit: predicted against observed")
        paths.append(_save(fig, out / "predicted_vs_observed.png", plt))

        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.scatter(c, np.log(loss) - np.log(pred), c=[colour[s] for s in n], zorder=3)
        ax.axhline(0, color="k", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel("ln observed - ln predicted")
        ax.set_title("residuals")
        paths.append(_save(fig, out / "residuals.png", plt))
    return paths


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    """A log-x axis with its labels, title and legend."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_to_tensorboard(paths: list[Path], tb_dir: Path) -> None:
    """Each PNG as an image of a TensorBoard run under ``tb_dir``."""
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb_dir))
    try:
        for path in paths:
            image = np.asarray(Image.open(path).convert("RGB"))
            writer.add_image(f"scaling/{path.stem}", image, global_step=0, dataformats="HWC")
    finally:
        writer.close()
