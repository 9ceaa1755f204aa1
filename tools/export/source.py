"""What an export is made from: a finished run's checkpoint, rebuilt in fp32.

The weights are consolidated from the DeepSpeed checkpoint (ZeRO 0-3, any
precision) into fp32 and loaded into a freshly built objective, so a mismatch
is an error here rather than in the user's hands. Beside the encoder come the
facts the model card reports: the run's config, step, ``summary.json`` and the
manifests of its training shards.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain.config import load_config
from pretrain.data.manifest import MANIFEST_NAME
from pretrain.objectives import build_objective
from pretrain.storage.checkpoints import fp32_state_dict, read_marker, resolve_checkpoint


class ExportError(ValueError):
    """The encoder cannot be exported as asked; the message says why (the CLI prints it as one line)."""


def trained_objective(ckpt: Path):
    """(objective with the checkpoint's fp32 weights, its RunConfig)."""
    cfg = load_config(ckpt / "config.yaml")
    if getattr(cfg.objective, "init_from", ""):
        # The checkpoint holds every weight: the run's starting weights need not exist here any more.
        cfg.objective.init_from = ""
    objective = build_objective(cfg)
    missing, unexpected = objective.load_state_dict(fp32_state_dict(ckpt), strict=False)
    # What DeepSpeed does not hold in fp32 (an EMA teacher) comes from the per-rank states.
    rank_states = [torch.load(f, map_location="cpu", weights_only=False).get("objective", {})
                   for f in sorted(ckpt.glob("rank*_state.pt"))]
    restored = objective.restore_from_rank_states(rank_states)
    missing = [k for k in missing if k not in restored]
    if missing or unexpected:
        raise RuntimeError(f"{ckpt}: checkpoint does not match the objective: missing {missing}, unexpected {unexpected}")
    return objective, cfg


@dataclass
class TrainedEncoder:
    """One encoder of a finished run and what its model card says about it."""

    name: str  # which of the objective's encoders (DINO: teacher / student; MAE: encoder)
    encoder: torch.nn.Module
    pool: str  # the token pooling the objective's features are read with
    cfg: Any  # the run's RunConfig
    step: int
    checkpoint: Path
    summary: dict[str, Any] | None  # the run's summary.json, when the run finished
    manifests: list[dict[str, Any]]  # manifest.json of each training shard folder that has one
    objective: torch.nn.Module  # the whole trained objective (CLIP exports both towers and the logit scale)


def open_trained_encoder(source: str | Path, encoder: str | None = None) -> TrainedEncoder:
    """The encoder ``encoder`` (default: the objective's headline) of a run directory or checkpoint."""
    ckpt = resolve_checkpoint(source)
    objective, cfg = trained_objective(ckpt)
    bundle = objective.eval_bundle()
    name = encoder or bundle.headline[0]
    if name not in bundle.encoders:
        raise ExportError(f"--encoder {name!r}: the {cfg.objective.name} run {ckpt} has encoders "
                         f"{', '.join(bundle.encoders)}")
    step = read_marker(ckpt)[0]
    return TrainedEncoder(name, bundle.encoders[name].eval(), bundle.pool, cfg, step, ckpt,
                          _run_summary(ckpt), _manifests(cfg), objective.eval())


def refuse_non_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """ExportError naming the tensors of ``what`` holding NaN or inf (a diverged run): never publish those."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise ExportError(f"{what}: {len(bad)} of {len(tensors)} tensors hold NaN or inf ({shown}); the run diverged "
                          "before this checkpoint: export an earlier checkpoint folder or retrain (e.g. a lower optim.lr)")


def _run_summary(ckpt: Path) -> dict[str, Any] | None:
    """summary.json of the run the checkpoint belongs to, when it describes this checkpoint."""
    for folder in (ckpt.parent.parent, ckpt.parent):
        path = folder / "summary.json"
        if path.is_file():
            summary = json.loads(path.read_text())
            if Path(summary.get("checkpoint", "")).name == ckpt.name:
                return summary
    return None


def _manifests(cfg) -> list[dict[str, Any]]:
    found = []
    for source in cfg.data.train:
        shards = source.shards if isinstance(source.shards, list) else [source.shards]
        for pattern in shards:
            path = Path(pattern)
            folder = path if path.is_dir() else path.parent
            if (folder / MANIFEST_NAME).is_file():
                found.append(json.loads((folder / MANIFEST_NAME).read_text()))
    return found
