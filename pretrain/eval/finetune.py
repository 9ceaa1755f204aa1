"""The ``finetune`` protocol: train an encoder end to end on labelled shards, then score held-out sets.

The run is an ordinary training run of the ``finetune`` objective
(:mod:`pretrain.objectives.finetune`) in its own run directory, through the
trainer and DeepSpeed engine: killed, it resumes where it stopped when the
same command runs again; finished (``summary.json`` written), it is not
trained again. The held-out sets are then scored by the trained classifier,
streamed like every feature extraction (:func:`pretrain.eval.features.stream_features`).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from pretrain.config import RunConfig, config_to_dict
from pretrain.config.load import apply_override, normalise_sources
from pretrain.config.typed import build
from pretrain.data.errors import DataError
from pretrain.data.stream import expand_shards
from pretrain.data.transforms import eval_view
from pretrain.eval.features import stream_features
from pretrain.models.encoder import eval_mode

# The recipe at CPU scale; every key can be overridden (``overrides``, as on the command line).
RECIPE = {
    "data": {"batch_size": 32, "num_workers": 1, "shuffle_buffer": 500},
    "optim": {"lr": 1.0e-3, "min_lr": 1.0e-6, "weight_decay": 0.05, "betas": [0.9, 0.999], "grad_clip": 1.0},
    "train": {"log_every": 25, "progress": False, "export_on_end": False, "keep_checkpoints": 1},
    "eval": {"at_start": False},
}
DROP_PATH = 0.1
IMBALANCE = 1.5  # classes more unequal than this (largest / smallest count) get inverse-frequency weights


def label_counts(spec: str | list[str]) -> tuple[Counter, int | None]:
    """Counts of single labels (.cls), and the number of findings when samples carry meta 'labels' instead;
    the images are not decoded."""
    counts: Counter = Counter()
    findings: Counter = Counter()
    width = None
    for raw in wds.WebDataset(expand_shards(spec), shardshuffle=False, nodesplitter=None, workersplitter=None,
                              empty_check=False):
        meta = json.loads(raw["json"]) if "json" in raw else {}
        if isinstance(meta, dict) and meta.get("labels") is not None:
            width = len(meta["labels"])
            findings.update(i for i, v in enumerate(meta["labels"]) if float(v))
            counts["__n__"] += 1
        elif "cls" in raw:
            counts[int(raw["cls"])] += 1
        else:
            raise DataError(f"{raw.get('__url__', spec)}: sample {raw.get('__key__')!r} has no label "
                             "(fine-tuning needs a .cls member or meta 'labels')")
    if width is not None:
        n = counts.pop("__n__")
        return Counter({i: findings[i] for i in range(width)} | {"__n__": n}), width
    if len(counts) < 2:
        raise ValueError(f"{spec}: fine-tuning needs at least two classes, found {sorted(counts)}")
    return counts, None


def _class_weights(counts: Counter, findings: int | None) -> list[float]:
    if findings is not None:  # positives weighted by negatives / positives per finding
        n = counts["__n__"]
        return [max(n - counts[i], 1) / max(counts[i], 1) for i in range(findings)]
    num = max(counts) + 1
    c = [max(counts.get(k, 0), 1) for k in range(num)]
    if max(c) / min(c) <= IMBALANCE:
        return []
    return [sum(c) / (num * v) for v in c]


def finetune_config(init_from: str, model_cfg: Any, train: str, run_dir: str, *, steps: int, intensity: str,
                    seed: int, pool: str = "cls", overrides: list[str] = ()) -> RunConfig:
    """The fine-tuning run's config: the model as pretrained (plus drop path), the objective sized from the labels."""
    counts, findings = label_counts(train)
    raw: dict[str, Any] = {
        "model": {**config_to_dict(model_cfg), "drop_path_rate": DROP_PATH},
        "objective": {"name": "finetune", "init_from": init_from, "pool": pool,
                      "num_classes": findings if findings is not None else max(counts) + 1,
                      "multi_label": findings is not None, "class_weights": _class_weights(counts, findings)},
        "data": {**RECIPE["data"], "train": [{"shards": train}], "intensity": intensity},
        "optim": {**RECIPE["optim"], "warmup_steps": max(1, steps // 10)},
        "train": {**RECIPE["train"], "steps": steps, "seed": seed, "run_dir": run_dir,
                  "ckpt_every": max(1, steps // 4)},
        "eval": dict(RECIPE["eval"]),
    }
    normalise_sources(raw)
    for o in overrides:
        apply_override(raw, o)
    normalise_sources(raw)
    return build(RunConfig, raw)


def finetune_and_predict(init_from: str, model_cfg: Any, train: str, sets: dict[str, str], out_dir: str, *,
                         steps: int, intensity: str, seed: int = 0, pool: str = "cls", batch_size: int = 64,
                         overrides: list[str] = ()) -> dict[str, dict[str, Any]]:
    """Fine-tune (or resume, or reuse a finished run in ``out_dir``), then ``{split: {"scores", "labels", "keys",
    "groups"}}`` of each held-out set in ``sets`` ({split: shards})."""
    from pretrain.engine.trainer import train as run_training
    from pretrain.objectives import build_objective
    from pretrain.storage.checkpoints import fp32_state_dict, resolve_checkpoint

    cfg = finetune_config(init_from, model_cfg, train, out_dir, steps=steps, intensity=intensity, seed=seed,
                          pool=pool, overrides=list(overrides))
    summary = Path(out_dir) / "summary.json"
    if not (summary.is_file() and json.loads(summary.read_text()).get("steps") == cfg.train.steps):
        run_training(cfg)
    cfg.objective.init_from = ""  # the checkpoint holds every weight
    objective = build_objective(cfg)
    objective.load_state_dict(fp32_state_dict(resolve_checkpoint(Path(out_dir))))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the trainer ran
    objective.to(device)
    size, chans = cfg.model.img_size_tuple(), cfg.model.in_chans

    def view(s: dict) -> torch.Tensor:
        return eval_view(s["image"], size, chans, intensity, key=s["__key__"])

    out = {}
    with eval_mode(objective):
        for split, spec in sets.items():
            fs = stream_features(lambda x: {"scores": objective.predict(x)}, spec, view, batch_size=batch_size,
                                 device=device)
            out[split] = {"scores": fs.features["scores"], "labels": fs.labels, "keys": fs.keys, "groups": fs.groups}
    return out
