"""``pretrain scaling collect RUNS...``: one table of finished runs (N, D, C, losses, evaluation) for ``fit``.

A path is a run directory or a sweep directory (``sweep.json``, written by
``launch``); a sweep's plan (the ``meta`` of its sweep file) gives each run its
budget. Unfinished runs are refused with the reason (no ``summary.json``, an
interrupted run, fewer steps than configured).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import yaml

from pretrain.config import load_config

COLUMNS = ("run", "model", "budget", "N", "N_total", "D", "C", "tokens", "flops_per_sample", "steps", "final_loss",
           "smoothed_loss", "knn", "linear", "raw_pixels_linear", "random_init_linear", "wall_seconds")
SMOOTH_FRACTION = 0.2  # smoothed_loss: the mean logged loss over the last 20% of the steps


def _sweep_budgets(info: dict[str, Any]) -> dict[str, float]:
    """run directory name -> planned budget, from the plan in the sweep file a ``sweep.json`` names."""
    try:
        plan = (yaml.safe_load(Path(info["sweep_file"]).read_text()) or {}).get("meta") or {}
    except OSError:
        return {}
    points = plan.get("points") or []
    return {r["name"]: points[r["index"]]["budget"] for r in info["runs"] if r["index"] < len(points)}


def run_dirs(paths: list[str | Path]) -> list[tuple[Path, float | None]]:
    """(run directory, planned budget or None) for every run the paths name."""
    found: list[tuple[Path, float | None]] = []
    for raw in paths:
        path = Path(raw)
        if (path / "sweep.json").is_file():
            info = json.loads((path / "sweep.json").read_text())
            budgets = _sweep_budgets(info)
            found += [(path / r["name"], budgets.get(r["name"])) for r in info["runs"]]
        elif (path / "config.yaml").is_file() or (path / "summary.json").is_file():
            found.append((path, None))
        else:
            raise FileNotFoundError(f"{path}: neither a run directory (config.yaml) nor a sweep directory (sweep.json)")
    return found


def unfinished_reason(run: Path) -> str | None:
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        latest = run / "checkpoints" / "latest"
        where = f"latest checkpoint {latest.read_text().strip()}" if latest.is_file() else "no checkpoint"
        return f"unfinished: no summary.json ({where})"
    summary = json.loads(summary_path.read_text())
    if summary.get("interrupted"):
        return f"unfinished: interrupted by {summary['interrupted']}"
    cfg = load_config(run / "config.yaml")
    if summary.get("steps", 0) < cfg.train.steps:
        return f"unfinished: {summary.get('steps')} of {cfg.train.steps} steps"
    return None


def _smoothed(run: Path, steps: int) -> float | None:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    values = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "loss/total" in row and row["step"] > (1 - SMOOTH_FRACTION) * steps:
            values.append(row["loss/total"])
    return sum(values) / len(values) if values else None


def _model_label(cfg) -> str:
    m = cfg.model
    if m.name != "vit":
        return m.name
    return m.preset or f"{m.embed_dim}x{m.depth}x{m.num_heads}"


def _compute(run: Path, summary: dict[str, Any]) -> dict[str, Any]:
    if "compute" in summary:
        return summary["compute"]
    # a run from before summary.json recorded compute: the same count from its config
    import torch

    from pretrain.engine.compute import compute_record
    from pretrain.objectives import build_objective

    cfg = load_config(run / "config.yaml")
    with torch.random.fork_rng(devices=[]):
        return compute_record(build_objective(cfg), cfg, summary["steps"], summary.get("world_size", 1))


def collect_row(run: Path, budget: float | None) -> dict[str, Any]:
    summary = json.loads((run / "summary.json").read_text())
    cfg = load_config(run / "config.yaml")
    compute = _compute(run, summary)
    ev = summary.get("eval") or {}
    pretrained = ev.get("pretrained") or {}
    return {
        "run": run.name, "model": _model_label(cfg), "budget": budget, "N": compute["params"]["non_embedding"],
        "N_total": compute["params"]["total"], "D": compute["samples_seen"], "C": compute["compute_flops"],
        "tokens": compute["tokens_seen"], "flops_per_sample": compute["flops_per_sample"], "steps": summary["steps"],
        "final_loss": summary.get("final_loss"), "smoothed_loss": _smoothed(run, summary["steps"]),
        "knn": pretrained.get("knn"), "linear": pretrained.get("linear"),
        "raw_pixels_linear": (ev.get("raw_pixels") or {}).get("linear"),
        "random_init_linear": (ev.get("random_init") or {}).get("linear"), "wall_seconds": summary.get("wall_seconds"),
    }


def collect(paths: list[str | Path], *, skip_unfinished: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows of the finished runs, "run: reason" for each unfinished one). ValueError when a run is
    unfinished and ``skip_unfinished`` is not set."""
    rows, refused = [], []
    for run, budget in run_dirs(paths):
        reason = unfinished_reason(run) if run.is_dir() else "no such run directory"
        if reason:
            refused.append(f"{run}: {reason}")
        else:
            rows.append(collect_row(run, budget))
    if refused and not skip_unfinished:
        raise ValueError(f"{len(refused)} run(s) not finished (--skip-unfinished to collect the rest): "
                         + "; ".join(refused))
    if not rows:
        raise ValueError("no finished run to collect")
    return rows, refused


def write_table(rows: list[dict[str, Any]], out: str | Path) -> Path:
    """CSV (``.csv``) or JSON (anything else) of the rows."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS} for r in rows)
    else:
        out.write_text(json.dumps(rows, indent=2) + "\n")
    return out


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a table ``collect`` wrote (CSV or JSON); CSV cells become numbers where they are."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scaling table not found: {path}")
    if path.suffix != ".csv":
        return json.loads(path.read_text())
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: _number(v) for k, v in row.items()})
    return rows


def _number(text: str) -> Any:
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text
