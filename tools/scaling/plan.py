"""``pretrain scaling plan``: an IsoFLOP grid as a sweep file.

For every compute budget C and model shape, the run that spends C: samples
D = C / f (f: the objective's model FLOPs per sample for that shape, the count
MFU uses), steps = D / global batch, rounded (the point's own C is recorded).
The cosine schedule follows each run's length (``train.steps``); warm-up is a
fixed fraction of it. The file runs as one job array with ``pretrain launch
slurm CONFIG --sweep FILE`` (or point by point with ``launch local``); its
``meta`` entry (not read by launch) records the plan for ``scaling collect``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pretrain.config import load_config
from pretrain.data.manifest import MANIFEST_NAME
from pretrain.engine.compute import parameter_counts

_SHAPE = re.compile(r"^(\d+)x(\d+)(?:x(\d+))?$")


@dataclass(frozen=True)
class Shape:
    """One model of the family: a preset, or width x depth (x heads; default one head per 32 channels)."""

    label: str
    overrides: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> "Shape":
        m = _SHAPE.match(text)
        if m:
            width, depth = int(m[1]), int(m[2])
            heads = int(m[3]) if m[3] else max(1, width // 32)
            if width % heads:
                raise ValueError(f"model shape {text!r}: width {width} is not divisible by {heads} heads")
            return cls(text, ("model.preset=null", f"model.embed_dim={width}", f"model.depth={depth}",
                              f"model.num_heads={heads}"))
        if re.fullmatch(r"[A-Za-z0-9_]+", text):
            return cls(text, (f"model.preset={text}",))
        raise ValueError(f"model shape {text!r}: a preset name (nano, micro, ...) or WIDTHxDEPTH[xHEADS]")


def dataset_size(cfg) -> int | None:
    """Samples in the training shards, from their manifests (None when a folder has none)."""
    total = 0
    for source in cfg.data.train:
        for pattern in source.shards if isinstance(source.shards, list) else [source.shards]:
            path = Path(pattern)
            manifest = (path if path.is_dir() else path.parent) / MANIFEST_NAME
            if not manifest.is_file():
                return None
            total += int(json.loads(manifest.read_text())["num_samples"])
    return total


def measure(config: str | None, overrides: list[str]) -> dict[str, Any]:
    """FLOPs per sample, parameters and global batch of one configuration (the objective built on CPU)."""
    import torch

    from pretrain.objectives import build_objective

    cfg = load_config(config, overrides)
    with torch.random.fork_rng(devices=[]):
        objective = build_objective(cfg)
    _, encoder = objective.eval_bundle().headline
    params = parameter_counts(encoder)
    return {"flops_per_sample": float(objective.flops_per_sample()), "N": params["non_embedding"],
            "params": params, "global_batch": cfg.data.batch_size * cfg.train.grad_accum, "cfg": cfg}


def plan(config: str | None, overrides: list[str], budgets: list[float], shapes: list[str], *,
         patch_sizes: list[int] | None = None, warmup_fraction: float = 0.05, min_steps: int = 20,
         world_size: int = 1, name: str = "scaling", max_concurrent: int | None = None) -> tuple[dict, list[str]]:
    """(sweep file content, notes on points left out)."""
    if not budgets or any(not b > 0 for b in budgets):
        raise ValueError(f"--budgets: positive FLOP counts, got {budgets}")
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"--warmup-fraction must be in [0, 1), got {warmup_fraction}")
    models = [Shape.parse(s) for s in shapes]
    patches = patch_sizes or [None]
    points, meta, notes = [], [], []
    size = None
    for model in models:
        for patch in patches:
            extra = [*model.overrides, *([f"model.patch_size={patch}"] if patch else [])]
            m = measure(config, [*overrides, *extra])
            size = size if size is not None else dataset_size(m["cfg"])
            batch = m["global_batch"] * world_size
            label = model.label + (f"/p{patch}" if patch else "")
            for budget in sorted(budgets):
                steps = round(budget / (m["flops_per_sample"] * batch))
                if steps < min_steps:
                    notes.append(f"{label} at C={budget:.3g}: {steps} steps (< --min-steps {min_steps}); left out")
                    continue
                samples = steps * batch
                warmup = max(1, round(warmup_fraction * steps)) if warmup_fraction else 0
                point = {o.split("=", 1)[0]: yaml.safe_load(o.split("=", 1)[1]) for o in [*overrides, *extra]}
                point.update({"train.steps": steps, "optim.warmup_steps": warmup})
                points.append(point)
                meta.append({"model": label, "budget": budget, "compute": m["flops_per_sample"] * samples,
                             "N": m["N"], "params": m["params"], "flops_per_sample": m["flops_per_sample"],
                             "samples": samples, "steps": steps,
                             "epochs": samples / size if size else None})
    if not points:
        raise ValueError("no point of the plan has enough steps: raise --budgets or lower --min-steps")
    sweep: dict[str, Any] = {"name": name, "points": points,
                             "meta": {"kind": "isoflop", "config": config, "overrides": overrides,
                                      "budgets": sorted(budgets), "world_size": world_size,
                                      "dataset_size": size, "points": meta}}
    if max_concurrent:
        sweep["max_concurrent"] = max_concurrent
    return sweep, notes


def write_plan(sweep: dict, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(sweep, sort_keys=False, width=120))
    return out


def describe(sweep: dict) -> str:
    rows = ["budget C     model        N (non-emb.)  FLOPs/sample  steps  samples    epochs"]
    for p in sweep["meta"]["points"]:
        epochs = f"{p['epochs']:.2f}" if p["epochs"] is not None else "?"
        rows.append(f"{p['budget']:<12.3g} {p['model']:<12} {p['N']:>12,}  {p['flops_per_sample']:>12.3g}  "
                    f"{p['steps']:>5}  {p['samples']:>9,}  {epochs:>6}")
    return "\n".join(rows)
