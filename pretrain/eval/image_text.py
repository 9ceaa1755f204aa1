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
                                 lambda texts: {"emb": bundle.embed_text(texts).float()})["emb"]
        image_row = {sample: row for row, sample in enumerate(split_order(len(samples)))}
        paired = [image_row[reported[j]] for j in split_order(len(reported))]
        result.update(recall_at_k(images[paired], reports))
        result["retrieval_pairs"] = len(reported)
    return result
