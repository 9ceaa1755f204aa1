"""``pretrain scaling fit TABLE --out DIR``: the parametric law, IsoFLOP parabolas, downstream saturation, the
compute-optimal frontier and predictions, all with bootstrap intervals; ``fit.json``, ``report.md``, figures."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .downstream import saturating_fit
from .isoflop import isoflop_fit
from .law import COARSE_GRID, DEFAULT_GRID, NAMES, LawFit, fit_law, flops_model, one_blas_thread, optimal_with_intervals

LOSS_KEYS = ("smoothed_loss", "final_loss", "loss")


def _loss_key(rows: list[dict], wanted: str | None) -> str:
    if wanted:
        if not any(r.get(wanted) is not None for r in rows):
            raise ValueError(f"--loss {wanted!r}: no row of the table has it")
        return wanted
    for key in LOSS_KEYS:
        if all(r.get(key) is not None for r in rows):
            return key
    raise ValueError(f"the table has no loss column every row fills ({', '.join(LOSS_KEYS)})")


@one_blas_thread
def fit_table(rows: list[dict], *, loss: str | None = None, bootstrap: int = 200, grid: str = "full",
              drop_highest: int = 0, level: float = 0.95, predict_compute: list[float] = (),
              metrics: list[str] = ("knn", "linear"), seed: int = 0) -> dict[str, Any]:
    key = _loss_key(rows, loss)
    used = sorted((dict(r) for r in rows if r.get(key) is not None), key=lambda r: r[key])
    if drop_highest:
        used = used[:-drop_highest]
    for r in used:
        if r.get("flops_per_sample") is None:  # a table from elsewhere: C = f N D with f = C / (N D)
            r["flops_per_sample"] = r["C"] / r["D"]
    n, d, y = (np.array([r[c] for r in used], dtype=float) for c in ("N", "D", key))
    law = fit_law(n, d, y, bootstrap=bootstrap, grid=DEFAULT_GRID if grid == "full" else COARSE_GRID, seed=seed)
    k, gamma = flops_model(n, [r["flops_per_sample"] for r in used])
    result: dict[str, Any] = {
        "loss": key, "runs": len(rows), "used": len(used), "dropped_highest_loss": drop_highest,
        "law": law.to_dict(level), "flops_model": {"k": k, "gamma": gamma},
        "isoflop": isoflop_fit(used, key, bootstrap=bootstrap, seed=seed, level=level),
    }
    budgets = sorted({float(r["budget"]) for r in used if r.get("budget") is not None}) or [float(max(r["C"] for r in used))]
    result["compute_optimal"] = [optimal_with_intervals(law, c, k, gamma, level) for c in budgets]
    result["predictions"] = [optimal_with_intervals(law, float(c), k, gamma, level) for c in predict_compute]
    result["downstream"] = {}
    for metric in metrics:
        have = [r for r in used if r.get(metric) is not None]
        if len(have) >= 4:
            result["downstream"][metric] = saturating_fit([r["C"] for r in have], [r[metric] for r in have],
                                                          bootstrap=bootstrap, seed=seed, level=level)
    return result


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _interval(entry: dict) -> str:
    iv = entry.get("interval")
    return f"{_fmt(entry['estimate'])} [{_fmt(iv[0])}, {_fmt(iv[1])}]" if iv else _fmt(entry["estimate"])


def report(rows: list[dict], result: dict[str, Any], figures: list[Path], title: str) -> str:
    law, level = result["law"], result["law"]["level"]
    lines = [f"# {title}", "", f"{result['used']} of {result['runs']} runs fitted on `{result['loss']}`"
             + (f" (the {result['dropped_highest_loss']} highest losses left out)" if result["dropped_highest_loss"] else "")
             + f"; intervals: {level:.0%} bootstrap over {law['bootstrap']} resamples of the runs.", ""]
    if len(rows) <= 60:
        lines += ["| model | budget C | N (non-emb.) | D (samples) | C | loss | kNN | linear |", "|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r.get("budget") or r["C"], r["N"])):
            cells = [r.get("model", ""), _fmt(r["budget"]) if r.get("budget") else "", f"{r['N']:,.0f}", f"{r['D']:,.0f}",
                     _fmt(r["C"]), _fmt(r[result["loss"]]) if r.get(result["loss"]) is not None else "",
                     *(f"{100 * r[m]:.1f} %" if r.get(m) is not None else "" for m in ("knn", "linear"))]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    lines += ["## Parametric law L(N, D) = E + A / N^alpha + B / D^beta", "", "| parameter | estimate | interval |",
              "|---|---|---|"]
    for name in NAMES:
        iv = law.get("intervals", {}).get(name)
        lines.append(f"| {name} | {_fmt(law['params'][name])} | " + (f"[{_fmt(iv[0])}, {_fmt(iv[1])}]" if iv else "—") + " |")
    if law.get("unidentified"):
        lines += ["", f"**Not identified by these runs**: {', '.join(law['unidentified'])} ended at a bound of the "
                  "search (the runs' loss hardly depends on that term); read the law's other terms and the "
                  "IsoFLOP minima, not its extrapolations."]
    fm = result["flops_model"]
    lines += ["", f"FLOPs per sample = {_fmt(fm['k'])} N^{fm['gamma']:.3f} (fitted to the runs); compute-optimal "
              "allocation at each budget:", "", "| budget C | N* | D* | L* |", "|---|---|---|---|"]
    for entry in result["compute_optimal"] + result["predictions"]:
        bound = " (at the search bound: no interior optimum)" if entry.get("at_search_bound") else ""
        lines.append(f"| {_fmt(entry['compute'])} | {_interval(entry['N'])}{bound} | {_interval(entry['D'])} "
                     f"| {_interval(entry['loss'])} |")
    iso = result["isoflop"]
    lines += ["", "## IsoFLOP parabolas (approach 2)", ""]
    for b in iso["budgets"]:
        where = "inside the sizes run" if b["minimum_inside"] else "outside the sizes run (extrapolated)"
        lines.append(f"- C = {_fmt(b['budget'])}: {b['points']} runs; " + (
            f"minimum N* = {b['N_opt']:,.0f}, loss {_fmt(b['loss_opt'])}, {where}" if b["N_opt"] else
            "the parabola opens downwards: no minimum"))
    for key, label in (("N_opt", "N*(C)"), ("D_opt", "D*(C)")):
        if iso.get(key):
            iv = iso[key].get("interval")
            lines.append(f"- {label} ∝ C^{iso[key]['exponent']:.3f}" + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else ""))
    if iso.get("note"):
        lines.append(f"- {iso['note']}")
    if result["downstream"]:
        lines += ["", "## Downstream: m(C) = m_inf - B C^(-c)", "", "| metric | m_inf | c |", "|---|---|---|"]
        for metric, fit in result["downstream"].items():
            iv = fit.get("intervals", {})
            cell = lambda k: _fmt(fit["params"][k]) + (f" [{_fmt(iv[k][0])}, {_fmt(iv[k][1])}]" if k in iv else "")  # noqa: E731
            lines.append(f"| {metric} | {cell('m_inf')} | {cell('c')} |")
    if figures:
        lines += ["", "## Figures", "", *(f"![{p.stem}]({p.name})" for p in figures)]
    return "\n".join(lines) + "\n"


@one_blas_thread
def write_fit(rows: list[dict], result: dict[str, Any], out: str | Path, *, title: str = "Scaling study",
              plots: bool = True) -> Path:
    from .plots import log_to_tensorboard, make_plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fit.json").write_text(json.dumps(result, indent=2) + "\n")
    figures: list[Path] = []
    if plots:
        fm = result["flops_model"]
        used = [r for r in rows if r.get(result["loss"]) is not None]
        figures = make_plots(used, result["loss"], LawFit.from_dict(result["law"]), result["isoflop"], out,
                             fm["k"], fm["gamma"], result["law"]["level"])
        log_to_tensorboard(figures, out / "tb")
    (out / "report.md").write_text(report(rows, result, figures, title))
    return out
