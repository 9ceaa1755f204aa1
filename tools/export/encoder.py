"""Export a trained encoder to a hub folder its target library loads without medpretrain.

One folder per export: ``model.safetensors`` (fp32, in the target library's
parameter names), ``config.json`` (what the target library reads, plus a
``medpretrain`` entry with our own model config, so ``pretrain eval`` and
``init_from`` read the folder back) and ``README.md`` (the model card).
Targets, one module each: ``timm_target`` (2D ViTs and ``timm:`` backbones)
and ``monai_target`` (3D ViTs and ``monai:`` backbones).

Before anything is written, the export is loaded by the target library in this
process (when it is installed) and its features compared with ours on random
input: a mapping that does not reproduce the encoder is an error here, not in
the user's hands. Nothing in a folder is a pickle.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import load_file, save_file

from pretrain.config import config_to_dict
from pretrain.config.typed import build
from pretrain.models.backbones import ModelConfig, build_backbone
from pretrain.storage.checkpoints import resolve_checkpoint

from . import card, monai_target, timm_target
from .source import ExportError, TrainedEncoder, open_trained_encoder, trained_objective

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
TARGETS: dict[str, ModuleType] = {"timm": timm_target, "monai": monai_target}
TOLERANCE = 1e-5  # fp32 features, ours vs the target library's, max abs difference


def default_target(model: ModelConfig) -> str:
    """timm for 2D ViTs and timm backbones, MONAI for 3D ViTs and MONAI backbones."""
    kind = model.name.partition(":")[0]
    return kind if kind in TARGETS else ("timm" if model.spatial_dims == 2 else "monai")


def _base_model(init_from: str, given: str | None) -> str | None:
    """The hub id the run continued from: given, or ``init_from`` when it names one (never a local path)."""
    if given:
        return given
    for prefix in ("hf-hub:", "hf_hub:"):
        if init_from.startswith(prefix):
            return init_from[len(prefix):].split("@")[0]
    return None


def export_encoder(source: str | Path, out: str | Path, *, encoder: str | None = None, target: str | None = None,
                   license: str = "other", base_model: str | None = None, repo_id: str | None = None) -> Path:
    """Export ``encoder`` (default: the run's headline) of a run or checkpoint to ``out``; returns ``out``.

    ``out`` is replaced whole only once the new export is complete and verified.
    """
    item = open_trained_encoder(source, encoder)
    model = item.cfg.model
    target = target or default_target(model)
    if target not in TARGETS:
        raise ExportError(f"--target {target!r}: one of {', '.join(TARGETS)}")
    module = TARGETS[target]
    reason = module.refusal(model)
    if reason:
        raise ExportError(f"cannot export to {target}: {reason}")
    config, weights = module.export(item.encoder, model, license)
    config["medpretrain"] = _native_meta(item, target, sum(v.numel() for v in item.encoder.state_dict().values()))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(weights, str(staging / WEIGHTS), metadata={"format": "pt", "step": str(item.step)})
        (staging / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        files = [WEIGHTS, CONFIG, CARD]
        snippet = module.snippet(repo_id or "YOUR-ORG/" + out.name, model, config)
        text = card.model_card(item, item.encoder, library=target, license=license,
                               base_model=_base_model(getattr(item.cfg.objective, "init_from", ""), base_model),
                               snippet=snippet, files=files, repo=repo_id)
        (staging / CARD).write_text(text)
        verify(staging, item)
        _publish_modes(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s (%s) -> %s for %s", item.checkpoint, item.name, out, target)
    return out


def _publish_modes(folder: Path) -> None:
    """mkdtemp makes a private folder; an export is for sharing: the modes a plain mkdir / open would give."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _native_meta(item: TrainedEncoder, target: str, num_parameters: int) -> dict:
    return {
        "target": target, "model": config_to_dict(item.cfg.model), "objective": item.cfg.objective.name,
        "encoder": item.name, "pool": item.pool, "step": item.step, "num_parameters": num_parameters,
        "preprocessing": {"intensity": item.cfg.data.intensity, "layout": "channels-first, native dtype -> float32",
                          "size": list(item.cfg.model.img_size_tuple())},
    }


def verify(folder: Path, item: TrainedEncoder) -> float | None:
    """Load ``folder`` with the target library and with our loader; ExportError when the features differ.

    Returns the largest difference, or None when the target library is not installed here.
    """
    meta = json.loads((folder / CONFIG).read_text())["medpretrain"]
    module = TARGETS[meta["target"]]
    ours = item.encoder
    x = torch.randn(2, ours.in_chans, *item.cfg.model.img_size_tuple(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours.eval()(x)
        back = load_exported_encoder(folder).eval()(x)
        try:
            theirs = module.load(str(folder))
        except ImportError as err:
            log.warning("%s is not installed: the export is not checked against it (%s)", meta["target"], err)
            theirs = None
        got = None if theirs is None else theirs(x)
    worst = 0.0
    for name, value in (("medpretrain's reload", back), (meta["target"], got)):
        if value is None:
            continue
        if value.shape != want.shape:
            raise ExportError(f"{meta['target']} export: {name} gives features {tuple(value.shape)}, ours {tuple(want.shape)}")
        diff = (value - want).abs().max().item()
        if not diff <= TOLERANCE:
            raise ExportError(f"{meta['target']} export: {name} differs from the trained encoder by {diff:.3g} "
                              f"(> {TOLERANCE}) on random input")
        worst = max(worst, diff)
    return worst if got is not None else None


def load_exported_encoder(folder: str | Path) -> torch.nn.Module:
    """Our encoder rebuilt from an export folder (strict: every key must match)."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG).read_text())
    meta = config.get("medpretrain")
    if meta is None:
        raise ValueError(f"{folder / CONFIG}: not a medpretrain export (no 'medpretrain' entry)")
    model = build(ModelConfig, meta["model"], "model")
    encoder = build_backbone(model)
    encoder.load_state_dict(TARGETS[meta["target"]].to_ours(load_file(str(folder / WEIGHTS)), model), strict=True)
    return encoder


def load_encoder(source: str | Path) -> tuple[torch.nn.Module, str, str]:
    """(encoder, intensity normalisation, pooling its objective reads it with) from an export folder,
    a run directory or a checkpoint."""
    source = Path(source)
    if (source / CONFIG).is_file():
        meta = json.loads((source / CONFIG).read_text()).get("medpretrain", {})
        return load_exported_encoder(source), meta.get("preprocessing", {}).get("intensity", "zscore"), meta.get("pool", "cls")
    objective, cfg = trained_objective(resolve_checkpoint(source))
    bundle = objective.eval_bundle()
    return bundle.headline[1], cfg.data.intensity, bundle.pool
