"""Zero-shot classification and image–text retrieval in an image–text objective's shared embedding space.

- Zero-shot: each class is the normalised mean of its prompts' embeddings;
  an image takes the class of highest cosine similarity. Accuracy and
  balanced accuracy (the mean of per-class recalls, for imbalanced sets).
- Retrieval: every held-out image and its own report; Recall@K is the
  fraction of queries whose positive is among the K most similar of the other
  side (image->text and text->image). Chance is K / N.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from pretrain.eval.knn import iter_labelled_samples, labelled_features, map_over_ranks, split_order

RECALL_AT = (1, 5, 10)


def class_embeddings(embed_text: Callable[[list[str]], torch.Tensor], prompts: dict[str, list[str]]) -> torch.Tensor:
    """(C, E): per class, the normalised mean of its prompts' normalised embeddings (classes in dict order)."""
    return torch.stack([F.normalize(embed_text(list(p)).float().mean(0), dim=0) for p in prompts.values()]).cpu()


def zero_shot_scores(image_NE: torch.Tensor, class_CE: torch.Tensor, labels_N: torch.Tensor) -> dict[str, float]:
    pred = (F.normalize(image_NE.float(), dim=1) @ F.normalize(class_CE.float(), dim=1).T).argmax(1)
    recalls = [float((pred[labels_N == c] == c).float().mean()) for c in labels_N.unique().tolist()]
    return {"zeroshot": float((pred == labels_N).float().mean()), "zeroshot_balanced": sum(recalls) / len(recalls)}


def recall_at_k(image_NE: torch.Tensor, text_NE: torch.Tensor, ks: Sequence[int] = RECALL_AT,
                image_ids: torch.Tensor | None = None, text_ids: torch.Tensor | None = None) -> dict[str, float]:
    """``i2t_r<K>`` and ``t2i_r<K>``; positives are equal ids (default: image i with text i)."""
    n = image_NE.shape[0]
    image_ids = torch.arange(n) if image_ids is None else image_ids
    text_ids = torch.arange(text_NE.shape[0]) if text_ids is None else text_ids
    sim = F.normalize(image_NE.float(), dim=1) @ F.normalize(text_NE.float(), dim=1).T
    positive = image_ids[:, None] == text_ids[None, :]
    out = {}
    for direction, s, pos in (("i2t", sim, positive), ("t2i", sim.T, positive.T)):
        top = s.topk(min(max(ks), s.shape[1]), dim=1).indices
        hit = pos.gather(1, top)
        for k in ks:
            out[f"{direction}_r{k}"] = float(hit[:, :k].any(1).float().mean())
    return out


def evaluate_image_text(bundle, spec: str | list[str], view: Callable[[dict], torch.Tensor], *, batch_size: int,
                        device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Zero-shot accuracy on the labelled set ``spec`` and, where its samples carry reports, Recall@K."""
    samples = list(iter_labelled_samples(spec))
    if not samples:
        raise ValueError(f"no samples in {spec!r}")
    names: dict[int, str] = {}
    for s in samples:
        names.setdefault(int(s["label"]), (s["meta"] or {}).get("label_name") or str(s["label"]))
    classes = [names[c] for c in sorted(names)]
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{spec!r}: zero-shot needs labels 0..C-1, got {sorted(names)}")
    feats, labels = labelled_features(lambda x: {"emb": bundle.embed_image(x)}, samples, view,
                                      batch_size=batch_size, device=device, dtype=dtype)
    images = feats["emb"]  # rows in split_order(len(samples))
    result = zero_shot_scores(images, class_embeddings(bundle.embed_text, bundle.class_prompts(classes)), labels)
    reported = [i for i, s in enumerate(samples) if (s["text"] or "").strip()]
    if reported:
        reports = map_over_ranks([samples[i]["text"].strip() for i in reported], batch_size,
                                 lambda texts: {"emb": bundle.embed_text(texts).float().cpu()})["emb"]
        image_row = {sample: row for row, sample in enumerate(split_order(len(samples)))}
        paired = [image_row[reported[j]] for j in split_order(len(reported))]
        result.update(recall_at_k(images[paired], reports))
        result["retrieval_pairs"] = len(reported)
    return result


def retrieval_hits(image_NE: torch.Tensor, text_NE: torch.Tensor, ks: Sequence[int] = RECALL_AT) -> dict[str, torch.Tensor]:
    """Per query, whether its own pair is among the K most similar: ``i2t_r<K>`` and ``t2i_r<K>``, (N,) bool."""
    sim = F.normalize(image_NE.float(), dim=1) @ F.normalize(text_NE.float(), dim=1).T
    out = {}
    for direction, s in (("i2t", sim), ("t2i", sim.T)):
        # rank of the positive: how many candidates score strictly higher than it
        rank = (s > s.diagonal()[:, None]).sum(1)
        for k in ks:
            out[f"{direction}_r{k}"] = rank < k
    return out


def image_text_predictions(bundle, spec, view: Callable[[dict], torch.Tensor], protocols: Sequence[str], *,
                           batch_size: int, device: torch.device = torch.device("cpu")) -> dict:
    """``zeroshot`` (class-prompt similarities as scores) and ``retrieval`` (Recall@K over the samples that
    carry a report) as :class:`pretrain.eval.protocols.Prediction` s, streamed from ``spec``."""
    import numpy as np

    from pretrain.eval.features import stream_features
    from pretrain.eval.metrics import metrics_for
    from pretrain.eval.protocols import Prediction

    fs = stream_features(lambda x: {"emb": bundle.embed_image(x)}, spec, view, batch_size=batch_size, device=device,
                         texts=True)
    images, out = fs.features["emb"], {}
    if "zeroshot" in protocols:
        if fs.multi_label or not fs.label_names:
            raise ValueError(f"{spec!r}: zero-shot needs single labels with their names (meta 'label_name')")
        classes = class_embeddings(bundle.embed_text, bundle.class_prompts(fs.label_names))
        sims = (F.normalize(images, dim=1) @ classes.T).double().numpy()
        y = fs.labels.numpy()
        out["zeroshot"] = Prediction(lambda idx: metrics_for("single", y[idx], sims[idx]), len(fs),
                                     {"classes": fs.label_names}, groups=fs.groups)
    if "retrieval" in protocols:
        rows = [i for i, t in enumerate(fs.texts) if t]
        if not rows:
            raise ValueError(f"{spec!r}: retrieval needs reports (.txt) on the samples; none has one")
        reports = map_over_ranks([fs.texts[i] for i in rows], batch_size,
                                 lambda texts: {"emb": bundle.embed_text(texts).float().cpu()})["emb"]
        reports = reports[torch.argsort(torch.tensor(split_order(len(rows))))]  # back to row order
        hits = {k: v.double().numpy() for k, v in retrieval_hits(images[rows], reports).items()}
        out["retrieval"] = Prediction(lambda idx: {k: float(v[idx].mean()) for k, v in hits.items()}, len(rows),
                                      {"pairs": len(rows), "chance_r1": 1 / len(rows)},
                                      groups=None if fs.groups is None else [fs.groups[i] for i in rows])
    return out
