"""The evaluation suite: every protocol on one encoder and its baselines, with confidence intervals.

Subjects are the pretrained encoder, the same architecture at random init,
and raw pixels (the view averaged down to the encoder's output grid; for the
dense probe, each grid cell's pixels as its token). Each subject's features
are extracted once per data set (and cached, :mod:`pretrain.eval.features`);
every frozen protocol reads them. Fine-tuning trains the subject end to end
through the trainer; zero-shot and retrieval use an image-text run's shared
embedding space.

Every metric gets a percentile-bootstrap interval over the report rows (over
patients where the shards name them), and the pretrained encoder is compared
with each baseline on the same resampled rows (paired bootstrap: the
difference, its interval and a two-sided p-value).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.data.transforms import eval_view
from pretrain.eval import protocols as P
from pretrain.eval.features import FeatureSet, cached_features, encoder_readings, pixel_readings, stream_features, weights_digest
from pretrain.eval.uncertainty import bootstrap_ci, paired_bootstrap

FROZEN = ("knn", "linear", "fewshot", "segment")
IMAGE_TEXT = ("zeroshot", "retrieval")
PROTOCOLS = (*FROZEN, "finetune", *IMAGE_TEXT)
HEADLINE = "pretrained"


@dataclass
class Subject:
    """One thing being evaluated: an encoder (or raw pixels when ``encoder`` is None)."""

    name: str
    encoder: nn.Module | None = None
    bundle: Any = None  # an objective's EvalBundle, for zero-shot and retrieval
    finetune: Callable[[], dict[str, dict]] | None = None  # runs fine-tuning: {split: {"scores", "labels", "keys"}}


@dataclass
class SuiteData:
    train: str | list[str]
    val: str | list[str]
    test: str | list[str] | None
    size: tuple[int, ...]  # the evaluation view's spatial size
    channels: int
    intensity: str
    grid: tuple[int, ...] = ()  # the encoder's output grid: raw pixels are averaged down to it
    batch_size: int = 64
    cache_dir: Path | None = None
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0
    options: dict = field(default_factory=dict)  # per protocol: keyword arguments (e.g. fewshot seeds)
    device: torch.device = torch.device("cpu")  # where the encoders run (they must be there already)
    dtype: torch.dtype = torch.float32  # of the views fed to them

    def view(self, sample: dict) -> torch.Tensor:
        return eval_view(sample["image"], self.size, self.channels, self.intensity, key=sample["__key__"])

    def mask_view(self, sample: dict) -> torch.Tensor:
        m = torch.from_numpy(np.asarray(sample["mask"]).astype(np.int64))[None].float()  # (1, 1, *spatial)
        return F.interpolate(m, size=self.size, mode="nearest-exact")[0, 0].to(torch.uint8)

    @property
    def patch(self) -> tuple[int, ...]:
        return tuple(s // g for s, g in zip(self.size, self.grid))

    def view_key(self) -> dict:
        return {"size": list(self.size), "channels": self.channels, "intensity": self.intensity}


def _readings(subject: Subject, dense: bool) -> tuple[str, ...]:
    if subject.encoder is None:
        return ()
    base = ("cls", "mean") + (("last4",) if hasattr(subject.encoder, "blocks") else ())
    return base + (("tokens",) if dense else ())


def _featurize(subject: Subject, data: SuiteData, dense: bool):
    if subject.encoder is None:
        return pixel_readings(data.grid, data.patch if dense else None)
    return encoder_readings(subject.encoder, _readings(subject, dense))


def extract(subject: Subject, data: SuiteData, dense: bool) -> dict[str, FeatureSet]:
    """The subject's feature sets of train, val (and test), cached per (encoder, data, view)."""
    featurize = _featurize(subject, data, dense)
    who = "pixels:" + ",".join(map(str, data.grid)) if subject.encoder is None else weights_digest(subject.encoder)
    key = {**data.view_key(), "readings": list(_readings(subject, dense)) or ["pixels"], "dense": dense}
    out = {}
    for split, spec in (("train", data.train), ("val", data.val), ("test", data.test)):
        if spec is None:
            continue
        out[split] = cached_features(who, spec, key, lambda spec=spec: stream_features(
            featurize, spec, data.view, batch_size=data.batch_size, device=data.device,
            dtype=data.dtype, mask_view=data.mask_view if dense else None),
            data.cache_dir)
    return out


def _probe_candidates(fs: FeatureSet) -> dict[str, list[str]]:
    if "pixels" in fs.features:
        return {"pixels": ["pixels"]}
    c = {"cls": ["cls"], "mean": ["mean"], "cls+mean": ["cls", "mean"]}
    if "last4" in fs.features:
        c["last4+mean"] = ["last4", "mean"]  # DINOv2's linear probe: 4 class tokens and the average pool
    return c


def frozen_predictions(subject: Subject, data: SuiteData, protocols: tuple[str, ...]) -> dict[str, P.Prediction]:
    from pretrain.eval.segment import dice_iou_from_stats, segment_probe

    sets = extract(subject, data, dense="segment" in protocols)
    roles = P.assign_roles(sets["train"], sets["val"], sets.get("test"), seed=data.seed)
    candidates = _probe_candidates(roles.fit)
    out: dict[str, P.Prediction] = {}
    if "knn" in protocols:
        out["knn"] = P.knn(roles, [r for r in ("cls", "mean", "pixels") if r in roles.fit.features])
    chosen = None
    if "linear" in protocols or "fewshot" in protocols:
        out["linear"] = P.linear(roles, candidates)
        chosen = candidates[out["linear"].choice["features"]]
    if "fewshot" in protocols:
        for setting, pred in P.few_shot(roles, chosen, **data.options.get("fewshot", {})).items():
            out[f"fewshot/{setting}"] = pred
    if "segment" in protocols:
        train, report = roles.pool, roles.report
        if train.masks is None or report.masks is None:
            raise ValueError("the dense probe needs masks (seg.npy) in the training and report shards")
        num_classes = int(max(train.masks.max(), report.masks.max())) + 1
        names = {v: k for k, v in train.mask_labels.items()}
        res = segment_probe(train.tokens, train.masks, report.tokens, report.masks, num_classes=num_classes,
                            class_names=[names.get(c, str(c)) for c in range(num_classes)], seed=data.seed)
        out["segment"] = P.Prediction(lambda idx, s=res.stats: dice_iou_from_stats(s, idx), len(report),
                                      {"weight_decay": res.weight_decay}, groups=report.groups)
    if "linear" not in protocols and "linear" in out:
        del out["linear"]
    return out


def finetune_prediction(subject: Subject, data: SuiteData) -> P.Prediction:
    preds = subject.finetune()
    split = "test" if data.test is not None else "val"
    p = preds[split]
    fs = FeatureSet({}, p["labels"], list(p["keys"]), p.get("groups"))
    return P.scores_prediction(p["scores"], fs, {"split": split})


def image_text_predictions(subject: Subject, data: SuiteData, protocols: tuple[str, ...]) -> dict[str, P.Prediction]:
    from pretrain.eval.image_text import image_text_predictions as predict

    spec = data.test if data.test is not None else data.val
    return predict(subject.bundle, spec, data.view, protocols, batch_size=data.batch_size, device=data.device)


def run_suite(subjects: list[Subject], data: SuiteData, protocols: tuple[str, ...] = PROTOCOLS,
              log: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """``{"protocols": {protocol: {subject: {"metrics": {m: {value, low, high}}, "choice", "spread"},
    "comparison": {baseline: {m: {a, b, diff, low, high, p}}}}}, ...}``; the first subject is compared
    with every other."""
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocol(s) {sorted(unknown)}; choose from {list(PROTOCOLS)}")
    preds: dict[str, dict[str, P.Prediction]] = {}
    for subject in subjects:
        mine: dict[str, P.Prediction] = {}
        frozen = tuple(p for p in protocols if p in FROZEN)
        if frozen:
            log(f"[eval] {subject.name}: {', '.join(frozen)}")
            mine.update(frozen_predictions(subject, data, frozen))
        if "finetune" in protocols and subject.finetune is not None:
            log(f"[eval] {subject.name}: fine-tuning")
            mine["finetune"] = finetune_prediction(subject, data)
        it = tuple(p for p in protocols if p in IMAGE_TEXT)
        if it and subject.bundle is not None and getattr(subject.bundle, "embed_image", None) is not None:
            log(f"[eval] {subject.name}: {', '.join(it)}")
            mine.update(image_text_predictions(subject, data, it))
        preds[subject.name] = mine
    head = subjects[0].name
    boot = dict(n_boot=data.n_boot, level=data.level, seed=data.seed)
    table: dict[str, Any] = {}
    for protocol in dict.fromkeys(k for m in preds.values() for k in m):
        entry: dict[str, Any] = {}
        for name, mine in preds.items():
            if protocol in mine:
                p = mine[protocol]
                entry[name] = {"metrics": bootstrap_ci(p.metric_fn, p.n, groups=p.groups, **boot), "choice": p.choice,
                               "spread": p.spread, "n": p.n}
        if head in preds and protocol in preds[head]:
            a = preds[head][protocol]
            entry["comparison"] = {
                other: paired_bootstrap(preds[other][protocol].metric_fn, a.metric_fn, a.n, groups=a.groups, **boot)
                for other in preds if other != head and protocol in preds[other]}
        table[protocol] = entry
    return {"report_split": "test" if data.test is not None else "val", "subjects": [s.name for s in subjects],
            "bootstrap": {"replicates": data.n_boot, "level": data.level}, "protocols": table}


def protocol_metrics(encoder: nn.Module | None, data: SuiteData, protocols: tuple[str, ...]) -> dict[str, Any]:
    """Frozen ``protocols`` of one encoder (None: raw pixels) as flat ``{"<protocol>/<metric>": value}``, and
    their bootstrap intervals under ``"intervals"``: what training logs at each evaluation (no cache: the
    weights change between evaluations)."""
    data = replace(data, cache_dir=None)
    out: dict[str, Any] = {"intervals": {}}
    boot = dict(n_boot=data.n_boot, level=data.level, seed=data.seed)
    for protocol, p in frozen_predictions(Subject("encoder", encoder), data, protocols).items():
        for metric, m in bootstrap_ci(p.metric_fn, p.n, groups=p.groups, **boot).items():
            out[f"{protocol}/{metric}"] = m["value"]
            out["intervals"][f"{protocol}/{metric}"] = [m["low"], m["high"]]
    return out
