"""The frozen-feature protocols: kNN, linear probe, few-shot, dense probe — on cached :class:`FeatureSet` s.

Three roles, so no number is ever chosen where it is reported:

- ``fit``: what a probe trains on (the training shards; the kNN's bank);
- ``select``: where each choice is made (feature set, weight decay, k): the
  validation shards when a test set is given, else a held-out fifth of the
  training shards;
- ``report``: where the metrics are measured (test, else validation).

After the choice, the probe is refitted on ``fit`` + ``select``. Each protocol
returns a :class:`Prediction`: a function computing its metrics on any subset
of the report rows, so the suite can bootstrap every metric and compare two
encoders on the same resampled rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.eval.features import FeatureSet
from pretrain.eval.linear import WEIGHT_DECAYS, fit_logistic, logistic_scores, standardise
from pretrain.eval.metrics import metrics_for

KNN_KS = (10, 20, 50)
KNN_TEMPERATURE = 0.07
SHOTS = (1, 2, 4, 8, 16)
FRACTIONS = (0.01, 0.1, 1.0)
FEWSHOT_SEEDS = 5


@dataclass
class Roles:
    fit: FeatureSet
    select: FeatureSet
    report: FeatureSet
    report_name: str  # "test" or "val"

    @property
    def pool(self) -> FeatureSet:
        """fit + select: what a probe is refitted on once its choice is made."""
        return concat(self.fit, self.select)


def concat(a: FeatureSet, b: FeatureSet) -> FeatureSet:
    cat = lambda x, y: None if x is None or y is None else torch.cat([x, y])  # noqa: E731
    return FeatureSet({n: torch.cat([a.features[n], b.features[n]]) for n in a.features}, torch.cat([a.labels, b.labels]),
                      a.keys + b.keys, None if a.groups is None or b.groups is None else a.groups + b.groups,
                      cat(a.tokens, b.tokens), cat(a.masks, b.masks), a.label_names, a.mask_labels)


def assign_roles(train: FeatureSet, val: FeatureSet, test: FeatureSet | None = None, *,
                 selection_fraction: float = 0.2, seed: int = 0) -> Roles:
    if test is not None:
        return Roles(train, val, test, "test")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    n_sel = max(1, int(round(len(train) * selection_fraction)))
    return Roles(train.subset(order[n_sel:].sort().values), train.subset(order[:n_sel].sort().values), val, "val")


def task_of(fs: FeatureSet) -> str:
    return "multi" if fs.multi_label else "single"


def headline_metric(fs: FeatureSet) -> str:
    return "auroc_macro" if fs.multi_label else "accuracy"


@dataclass
class Prediction:
    """A protocol's predictions on the report rows and what it chose on the selection rows."""

    metric_fn: Callable[[np.ndarray], dict[str, float]]  # metrics on report rows idx
    n: int
    choice: dict = field(default_factory=dict)
    spread: dict[str, float] = field(default_factory=dict)  # std over seeds, where a protocol has seeds
    groups: list[str] | None = None  # patient key per report row: the bootstrap resamples patients


def scores_prediction(scores: torch.Tensor, report: FeatureSet, choice: dict) -> Prediction:
    y, s = report.labels.numpy(), scores.double().numpy()
    task, names = task_of(report), report.label_names or None
    return Prediction(lambda idx: metrics_for(task, y[idx], s[idx], names), len(report), choice, groups=report.groups)


def _selection_score(fs: FeatureSet, scores: torch.Tensor) -> float:
    return metrics_for(task_of(fs), fs.labels.numpy(), scores.double().numpy())[headline_metric(fs)]


# --- kNN ----------------------------------------------------------------------------------------------------
def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, *, k: int, num_classes: int,
               temperature: float = KNN_TEMPERATURE, multi_label: bool = False, chunk: int = 1024) -> torch.Tensor:
    """(Q, C) vote shares of temperature-weighted cosine kNN (DINO's protocol); multi-label: the weighted
    mean of the neighbours' multi-hot labels."""
    bank, query = F.normalize(bank.float(), dim=1), F.normalize(query.float(), dim=1)
    k = min(k, bank.shape[0])
    onehot = bank_labels.float() if multi_label else F.one_hot(bank_labels, num_classes).float()
    out = []
    for start in range(0, query.shape[0], chunk):
        sim, idx = (query[start:start + chunk] @ bank.T).topk(k, dim=1)
        w = ((sim - sim[:, :1]) / temperature).exp()  # shifted by the best: exp cannot overflow
        out.append(torch.einsum("qk,qkc->qc", w, onehot[idx]) / w.sum(1, keepdim=True))
    return torch.cat(out)


def knn(roles: Roles, readings: list[str], ks=KNN_KS) -> Prediction:
    """The (reading, k) best on the selection rows; the bank is then fit + select."""
    kw = dict(num_classes=roles.fit.num_classes, multi_label=roles.fit.multi_label)
    best = max(((_selection_score(roles.select, knn_scores(roles.fit.features[r], roles.fit.labels,
                                                           roles.select.features[r], k=k, **kw)), r, k)
                for r in readings for k in ks), key=lambda t: t[0])
    score, reading, k = best
    bank = roles.pool
    scores = knn_scores(bank.features[reading], bank.labels, roles.report.features[reading], k=k, **kw)
    return scores_prediction(scores, roles.report, {"reading": reading, "k": k, "selection": score})


# --- linear probe -------------------------------------------------------------------------------------------
def _class_weight(fs: FeatureSet) -> torch.Tensor | None:
    """Inverse class frequency, for an imbalanced single-label set (None when balanced within 1.5x)."""
    if fs.multi_label:
        return None
    counts = torch.bincount(fs.labels, minlength=fs.num_classes).double()
    present = counts[counts > 0]
    if present.max() <= 1.5 * present.min():
        return None
    return torch.where(counts > 0, counts.sum() / counts.clamp_min(1) / len(present), torch.zeros_like(counts))


def _stack(fs: FeatureSet, parts: list[str]) -> torch.Tensor:
    return torch.cat([fs.features[p] for p in parts], 1)


def choose_probe(fit: FeatureSet, select: FeatureSet, candidates: dict[str, list[str]],
                 weight_decays=WEIGHT_DECAYS) -> tuple[str, float, float]:
    """(feature set, weight decay, selection score): all weight decays of a feature set fitted as one batch."""
    num_classes, multi = max(fit.num_classes, select.num_classes), fit.multi_label
    best = None
    for name, parts in candidates.items():
        x_fit, x_sel = standardise(_stack(fit, parts), _stack(select, parts))
        W, b = fit_logistic(x_fit, fit.labels, num_classes, weight_decays, multi_label=multi,
                            class_weight=_class_weight(fit))
        probs = logistic_scores(x_sel, W, b, multi)
        for g, wd in enumerate(weight_decays):
            score = _selection_score(select, probs[g])
            if best is None or score > best[2]:  # ties: the first, the weakest regularisation
                best = (name, wd, score)
    return best


def probe_scores(train: FeatureSet, report: FeatureSet, parts: list[str], wd: float) -> torch.Tensor:
    num_classes = max(train.num_classes, report.num_classes)
    x_train, x_report = standardise(_stack(train, parts), _stack(report, parts))
    W, b = fit_logistic(x_train, train.labels, num_classes, [wd], multi_label=train.multi_label,
                        class_weight=_class_weight(train))
    return logistic_scores(x_report, W, b, train.multi_label)[0]


def linear(roles: Roles, candidates: dict[str, list[str]], weight_decays=WEIGHT_DECAYS) -> Prediction:
    name, wd, score = choose_probe(roles.fit, roles.select, candidates, weight_decays)
    scores = probe_scores(roles.pool, roles.report, candidates[name], wd)
    return scores_prediction(scores, roles.report, {"features": name, "weight_decay": wd, "selection": score})


# --- few-shot -----------------------------------------------------------------------------------------------
def few_shot_indices(fs: FeatureSet, *, shots: int | None = None, fraction: float | None = None,
                     seed: int) -> torch.Tensor:
    """A class-stratified draw from ``fs``: ``shots`` per class, or ``fraction`` of each class (at least one).
    Multi-label sets draw by fraction only, uniformly."""
    g = torch.Generator().manual_seed(seed)
    if fs.multi_label:
        if shots is not None:
            raise ValueError("k-shot needs single-label data; use label fractions for multi-label sets")
        n = max(1, int(round(len(fs) * fraction)))
        return torch.randperm(len(fs), generator=g)[:n].sort().values
    picks = []
    for c in range(fs.num_classes):
        members = (fs.labels == c).nonzero().flatten()
        if members.numel() == 0:
            continue
        take = shots if shots is not None else max(1, int(round(members.numel() * fraction)))
        picks.append(members[torch.randperm(members.numel(), generator=g)[:take]])
    return torch.cat(picks).sort().values


def few_shot(roles: Roles, parts: list[str], *, shots=SHOTS, fractions=FRACTIONS, seeds: int = FEWSHOT_SEEDS,
             weight_decays=WEIGHT_DECAYS) -> dict[str, Prediction]:
    """Per setting (``k<shots>``, ``p<percent>``): the probe on ``parts`` trained on a stratified draw of the
    fit rows, its weight decay chosen on the selection rows, for each of ``seeds`` draws; metrics are the
    mean over draws (``spread``: their standard deviation)."""
    settings = ([] if roles.fit.multi_label else [(f"k{k}", dict(shots=k)) for k in shots]) + \
               [(f"p{100 * f:g}", dict(fraction=f)) for f in fractions]
    report = roles.report
    y, task, names = report.labels.numpy(), task_of(report), report.label_names or None
    out = {}
    for setting, draw in settings:
        draws = range(1 if draw.get("fraction") == 1.0 else seeds)  # the whole set has one draw
        per_seed, choices = [], []
        for seed in draws:
            sub = roles.fit.subset(few_shot_indices(roles.fit, seed=seed, **draw))
            _, wd, _ = choose_probe(sub, roles.select, {"chosen": parts}, weight_decays)
            per_seed.append(probe_scores(sub, report, parts, wd).double().numpy())
            choices.append(wd)

        def metric_fn(idx, per_seed=per_seed):
            runs = [metrics_for(task, y[idx], s[idx], names) for s in per_seed]
            return {m: float(np.mean([r[m] for r in runs])) for m in runs[0]}
        full = [metrics_for(task, y, s, names) for s in per_seed]
        spread = {m: float(np.std([r[m] for r in full])) for m in full[0]}
        out[setting] = Prediction(metric_fn, len(report), {"draws": len(per_seed), "weight_decays": choices,
                                                           "train_samples": int(len(sub))}, spread, report.groups)
    return out
