"""Export a trained encoder to a hub folder its target library loads without medpretrain.

One folder per export, in the target library's names, fp32 safetensors and
text only, with a model card (``README.md``) and a ``medpretrain`` entry in
its config (our own model config, so ``pretrain eval`` and ``init_from`` read
the folder back). Targets, one module each: ``timm_target`` (2D ViTs and
``timm:`` backbones) and ``monai_target`` (3D ViTs and ``monai:`` backbones)
write one encoder as ``model.safetensors`` + ``config.json``;
``open_clip_target`` writes a CLIP run's whole model (both towers, the logit
scale) in open_clip's layout.

Before anything is written, the export is loaded by the target library in this
process (when it is installed) and its features compared with ours on random
input: a mapping that does not reproduce the encoder is an error here, not in
the user's hands.
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

from . import card, monai_target, open_clip_target, timm_target
from .layout import CARD, CONFIG, WEIGHTS, export_meta, is_export
from .source import ExportError, TrainedEncoder, open_trained_encoder, refuse_non_finite, trained_objective

log = logging.getLogger(__name__)

TARGETS: dict[str, ModuleType] = {"timm": timm_target, "monai": monai_target}  # one encoder each
ALL_TARGETS = (*TARGETS, open_clip_target.NAME)
TOLERANCE = 1e-5  # fp32 features, ours vs the target library's, max abs difference


def default_target(item: TrainedEncoder) -> str:
    """open_clip for a CLIP run it can hold (else its image tower, the reason logged); timm for 2D ViTs and
    timm backbones, MONAI for 3D ViTs and MONAI backbones."""
    if item.cfg.objective.name == "clip":
        try:
            reason = open_clip_target.refusal(item)
        except ExportError as err:  # open_clip not installed
            reason = str(err)
        if reason is None:
            return open_clip_target.NAME
        log.warning("exporting the CLIP run's image tower alone: %s", reason)
    model = item.cfg.model
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
    target = target or default_target(item)
    if target not in ALL_TARGETS:
        raise ExportError(f"--target {target!r}: one of {', '.join(ALL_TARGETS)}")
    whole_model = target == open_clip_target.NAME
    weights = item.objective.state_dict() if whole_model else item.encoder.state_dict()
    refuse_non_finite(weights, f"{item.checkpoint} ({'the whole model' if whole_model else item.name})")
    reason = open_clip_target.refusal(item) if whole_model else TARGETS[target].refusal(item.cfg.model)
    if reason:
        raise ExportError(f"cannot export to {target}: {reason}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    repo = repo_id or "YOUR-ORG/" + out.name
    meta = _native_meta(item, target, sum(v.numel() for v in item.encoder.state_dict().values()))
    try:
        if whole_model:
            files = open_clip_target.write(staging, item, str(out.resolve()), meta)
            snippet = open_clip_target.snippet(repo, item, json.loads((staging / open_clip_target.CONFIG).read_text()))
            notes = open_clip_target.input_notes(item)
        else:
            module = TARGETS[target]
            config, weights = module.export(item.encoder, item.cfg.model, license)
            config["medpretrain"] = meta
            save_file(weights, str(staging / WEIGHTS), metadata={"format": "pt", "step": str(item.step)})
            (staging / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            files, snippet, notes = [WEIGHTS, CONFIG], module.snippet(repo, item.cfg.model, config), []
        text = card.model_card(item, item.encoder, library=target, license=license,
                               base_model=_base_model(getattr(item.cfg.objective, "init_from", ""), base_model),
                               snippet=snippet, files=sorted([*files, CARD]), repo=repo_id, input_notes=notes)
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

    Returns the largest difference from the target library, or None when it is not installed here.
    """
    meta = export_meta(folder)
    x = torch.randn(2, item.encoder.in_chans, *item.cfg.model.img_size_tuple(),
                    generator=torch.Generator().manual_seed(0))
    worst = None
    with torch.no_grad():
        want = item.encoder.eval()(x)
        if not torch.isfinite(want).all():  # finite weights too large to compute with: a diverged run too
            largest = max(v.abs().max().item() for v in item.encoder.state_dict().values() if v.is_floating_point())
            raise ExportError(f"{item.checkpoint} ({item.name}): the encoder gives NaN or inf features on random input "
                              f"(its largest weight is {largest:.3g}); the run diverged before this checkpoint: export "
                              "an earlier checkpoint folder or retrain (e.g. a lower optim.lr)")
        checks = {"medpretrain's reload": load_exported_encoder(folder).eval()(x)}
        if meta["target"] == open_clip_target.NAME:  # both towers and the scale; raises on a mismatch
            worst = open_clip_target.verify(folder, item, TOLERANCE)
        else:
            try:
                checks[meta["target"]] = TARGETS[meta["target"]].load(str(folder))(x)
            except ImportError as err:
                log.warning("%s is not installed: the export is not checked against it (%s)", meta["target"], err)
    for name, value in checks.items():
        if value.shape != want.shape:
            raise ExportError(f"{meta['target']} export: {name} gives features {tuple(value.shape)}, ours {tuple(want.shape)}")
        diff = (value - want).abs().max().item()
        if not diff <= TOLERANCE:
            raise ExportError(f"{meta['target']} export: {name} differs from the trained encoder by {diff:.3g} "
                              f"(> {TOLERANCE}) on random input")
        if name == meta["target"]:
            worst = diff
    return worst


def load_exported_encoder(folder: str | Path) -> torch.nn.Module:
    """Our encoder (a CLIP export: its image tower) rebuilt from an export folder (strict: every key must match)."""
    folder = Path(folder)
    meta = export_meta(folder)
    if meta["target"] == open_clip_target.NAME:
        model = build(ModelConfig, open_clip_target.image_tower_model(meta["model"]), "model")
        state = open_clip_target.to_ours(folder, model)
    else:
        model = build(ModelConfig, meta["model"], "model")
        state = TARGETS[meta["target"]].to_ours(load_file(str(folder / WEIGHTS)), model)
    encoder = build_backbone(model)
    encoder.load_state_dict(state, strict=True)
    return encoder


def load_encoder(source: str | Path) -> tuple[torch.nn.Module, str, str]:
    """(encoder, intensity normalisation, pooling its objective reads it with) from an export folder,
    a run directory or a checkpoint."""
    source = Path(source)
    if is_export(source):
        meta = export_meta(source)
        return load_exported_encoder(source), meta.get("preprocessing", {}).get("intensity", "zscore"), meta.get("pool", "cls")
    objective, cfg = trained_objective(resolve_checkpoint(source))
    bundle = objective.eval_bundle()
    return bundle.headline[1], cfg.data.intensity, bundle.pool
