"""The model card: ``README.md`` with Hugging Face hub metadata, written from the run's own records.

Everything comes from the checkpoint's config, ``summary.json`` and the
training shards' manifests; no path, file name or sample identifier is
written (a manifest's ``source`` and ``failed`` entries stay out).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pretrain.config import config_to_dict

from .source import TrainedEncoder

_INTENSITY = {
    "zscore": ("per image and channel: subtract the mean, divide by the standard deviation (unbiased, "
               "clamped at 1e-6) over all pixels/voxels, from the native intensities (HU for CT, raw values "
               "for X-ray and MRI)"),
    "range": "integers divided by their dtype's range (uint8 / 255, uint16 / 65535); floats min-max scaled to [0, 1]",
    "none": "native intensities, unchanged",
}
_ZSCORE_CODE = "x = (x - x.mean(dim=spatial, keepdim=True)) / x.std(dim=spatial, keepdim=True).clamp_min(1e-6)"
_NEEDS = {"open_clip": "`open_clip_torch`, `transformers`"}
_METHOD_TAGS = {"mae": "masked-image-modeling", "dino": "self-distillation", "clip": "contrastive-image-text",
                "lvm_med": "graph-matching-contrastive"}


def _yaml_list(name: str, values: list[str]) -> list[str]:
    return [f"{name}:", *(f"- {v}" for v in values)]


def front_matter(item: TrainedEncoder, library: str, license: str, base_model: str | None) -> str:
    dims = f"{item.cfg.model.spatial_dims}d"
    objective = item.cfg.objective.name
    supervision = "vision-language" if objective == "clip" else "self-supervised"
    tags = ["medpretrain", "medical-imaging", supervision, objective, _METHOD_TAGS.get(objective, objective),
            dims, "image-feature-extraction", library]
    # an open_clip export is the whole image-text model: it classifies zero-shot from class prompts
    pipeline = "zero-shot-image-classification" if library == "open_clip" else "image-feature-extraction"
    lines = ["---", f"library_name: {library}", f"license: {license}", f"pipeline_tag: {pipeline}",
             *_yaml_list("tags", list(dict.fromkeys(tags)))]
    if base_model:
        lines.append(f"base_model: {base_model}")
    return "\n".join(lines + ["---", ""]) + "\n"


def _data_section(item: TrainedEncoder) -> list[str]:
    cfg = item.cfg
    lines = ["## Data", ""]
    if not item.manifests:
        lines.append("The training shards' manifests were not found where the run read them; counts unknown.")
    for i, m in enumerate(item.manifests):
        shapes = "; ".join(f"{d}D {m['shape_min'][d]} to {m['shape_max'][d]}" for d in sorted(m.get("shape_min", {})))
        classes = m.get("classes")
        lines += [
            f"- shard set {i + 1}: {m['num_samples']:,} samples ({m.get('num_failed', 0)} inputs rejected at ingestion), "
            f"{', '.join(f'{d}D' for d in m.get('spatial_dims', []))}, channels {m.get('channels')}, "
            f"stored as {', '.join(f'{k} ({v:,})' for k, v in m.get('dtypes', {}).items())}",
            f"  - spatial sizes: {shapes or 'not recorded'}",
            f"  - labels: {len(classes)} classes (not used by the objective)" if classes else "  - labels: none",
        ]
        for key in ("modalities", "spacing"):
            if key in m:
                lines.append(f"  - {key}: {m[key]}")
    lines += ["", f"Every sample is read at its native dtype, normalised ({cfg.data.intensity}: "
              f"{_INTENSITY[cfg.data.intensity]}) and resized to {list(cfg.model.img_size_tuple())} for evaluation.", ""]
    return lines


def _compute_section(item: TrainedEncoder, encoder) -> list[str]:
    cfg, summary = item.cfg, item.summary or {}
    world = int(summary.get("world_size", 1))
    global_batch = cfg.data.batch_size * cfg.train.grad_accum * world
    samples = item.step * global_batch
    lines = ["## Compute", "", f"- optimizer steps: {item.step:,}; global batch {global_batch} "
             f"({cfg.data.batch_size} per rank x {cfg.train.grad_accum} accumulation x {world} rank(s))",
             f"- samples seen: {samples:,}"]
    if hasattr(encoder, "num_patches"):
        tokens = encoder.num_patches()
        lines.append(f"- patch tokens seen: about {samples * tokens:,} ({tokens} per sample at the native size; "
                     "multi-crop and masking change the exact count)")
    if "wall_seconds" in summary:
        hours = summary["wall_seconds"] * world / 3600
        lines.append(f"- wall time {summary['wall_seconds']:,.0f} s on {world} rank(s): {hours:.3f} device-hours "
                     f"({cfg.train.precision}, ZeRO stage {cfg.train.zero_stage})")
    return lines + [""]


def _fmt(value: Any) -> str:
    return f"{100 * value:.1f} %" if isinstance(value, float) and not math.isnan(value) else "—"


def _eval_section(item: TrainedEncoder) -> list[str]:
    ev = (item.summary or {}).get("eval")
    lines = ["## Evaluation", ""]
    if not ev:
        return lines + ["The run recorded no evaluation (no labelled `eval.knn_train` / `eval.knn_val` shards).", ""]
    lines += ["Frozen features on the run's held-out labelled shards: weighted kNN (k = "
              f"{item.cfg.eval.k}, cosine, T = {item.cfg.eval.temperature}) and a linear probe (logistic regression, "
              "weight decay chosen on a split of the train set). A representation counts where it beats both baselines.",
              "", "| features | kNN (class token) | kNN (mean patch) | kNN | linear probe |", "|---|---|---|---|---|"]
    rows = [("raw pixels (the view pooled to the encoder's grid)", ev.get("raw_pixels")),
            ("random-init encoder", ev.get("random_init"))]
    pretrained = ev.get("pretrained")
    if pretrained:
        rows.append((f"**this encoder** ({pretrained.get('encoder', item.name)})", pretrained))
    for label, r in rows:
        if r:
            lines.append(f"| {label} | {_fmt(r.get('knn_cls'))} | {_fmt(r.get('knn_mean'))} | {_fmt(r.get('knn'))} "
                         f"| {_fmt(r.get('linear'))} |")
    gain = ev.get("gain_over_baselines") or {}
    if gain:
        lines += ["", f"Gain over the better baseline: linear {100 * gain['linear']:+.1f} points, "
                      f"kNN {100 * gain['knn']:+.1f} points."]
    image_text = [(label, r) for label, r in rows if r and "zeroshot" in r]
    if image_text:
        lines += ["", "Image-text (the run's class prompts; Recall@K between held-out images and their reports):", "",
                  "| model | zero-shot | zero-shot (balanced) | R@1 / R@5 / R@10 image->text | text->image |",
                  "|---|---|---|---|---|"]
        recall = lambda r, d: " / ".join(_fmt(r.get(f"{d}_r{k}")) for k in (1, 5, 10))  # noqa: E731
        for label, r in image_text:
            lines.append(f"| {label} | {_fmt(r['zeroshot'])} | {_fmt(r.get('zeroshot_balanced'))} | {recall(r, 'i2t')} "
                         f"| {recall(r, 't2i')} |")
    if pretrained and pretrained.get("encoder", item.name) != item.name:
        lines.append(f"\nThe table's headline is the run's `{pretrained['encoder']}`; this export is `{item.name}`.")
    return lines + [""]


def _public(value: Any) -> Any:
    """A setting as the card may show it: a local path (a text tower folder, a prompts file) is not shown."""
    if isinstance(value, str) and value and ("/" in value or "\\" in value) and Path(value).expanduser().exists():
        return "(a local file)"
    return value


def _text_tower_line(item: TrainedEncoder) -> list[str]:
    text = getattr(item.objective, "text", None)
    if text is None:
        return []
    c = text.transformer.config
    params = sum(p.numel() for p in text.parameters())
    return [f"- text tower: `{c.model_type}`, {c.num_hidden_layers} layers, width {c.hidden_size}, vocabulary "
            f"{c.vocab_size:,}, {params:,} parameters with the projection"]


def _recipe_section(item: TrainedEncoder, encoder) -> list[str]:
    cfg = item.cfg
    objective = {k: _public(v) for k, v in config_to_dict(cfg.objective).items() if k not in ("init_from",)}
    model = {k: v for k, v in config_to_dict(cfg.model).items() if v not in (None, {}, "")}
    params = sum(p.numel() for p in encoder.parameters())
    return [
        "## Recipe", "",
        f"- objective `{cfg.objective.name}`, exported encoder `{item.name}`, features read with `{item.pool}` pooling",
        f"- backbone `{cfg.model.name}`, {params:,} parameters: " + ", ".join(f"{k}={v}" for k, v in model.items()),
        *_text_tower_line(item),
        "- objective settings: " + ", ".join(f"{k}={v}" for k, v in objective.items()),
        f"- AdamW lr {cfg.optim.lr} ({cfg.optim.schedule}, {cfg.optim.warmup_steps} warm-up steps), "
        f"weight decay {cfg.optim.weight_decay}, gradient clip {cfg.optim.grad_clip}, seed {cfg.train.seed}",
        "- continued from pretrained weights" if getattr(cfg.objective, "init_from", "") else "- trained from random initialisation",
        "",
    ]


def _use_section(item: TrainedEncoder, snippet: str, library: str, notes: list[str]) -> list[str]:
    model = item.cfg.model
    spatial = "(2, 3)" if model.spatial_dims == 2 else "(2, 3, 4)"
    prep = ["## Input", "",
            f"{model.in_chans}-channel {model.spatial_dims}D input of size {list(model.img_size_tuple())}, float32, "
            f"channels first. Intensities: {_INTENSITY[item.cfg.data.intensity]}."]
    if item.cfg.data.intensity == "zscore":
        prep += ["", "```python", f"spatial = {spatial}", _ZSCORE_CODE, "```"]
    if notes:
        prep += ["", *notes]
    elif model.in_chans == 1:
        prep += ["", "Grey-scale images are fed as they are (1 channel); average RGB images to one channel first."]
    prep += ["", f"## Load with {library}", "", snippet.rstrip(), ""]
    return prep


LIMITS = [
    "## Intended use and limits", "",
    "A research encoder for medical images: frozen features for kNN / linear probes, or initial weights for "
    "fine-tuning on a labelled task. It is not a medical device and makes no diagnosis; any clinical use needs "
    "validation on the target population, scanner and protocol. Features reflect the pretraining data above: "
    "other modalities, body parts, resolutions or intensity handling can fall outside what it learned, and "
    "biases of the pretraining population carry over.", "",
]


def model_card(item: TrainedEncoder, encoder, *, library: str, license: str, base_model: str | None,
               snippet: str, files: list[str], repo: str | None, input_notes: list[str] = ()) -> str:
    dims = f"{item.cfg.model.spatial_dims}D"
    name = repo.rpartition("/")[2] if repo else "medpretrain"
    title = f"# {name}: {dims} `{item.cfg.model.name}` encoder ({item.cfg.objective.name})"
    body = [title, "", f"Pretrained with **{item.cfg.objective.name}** by "
            "medpretrain and exported for "
            f"`{library}`; loading needs {_NEEDS.get(library, f'`{library}`')}, `torch` and `safetensors`, not medpretrain.", "",
            *_recipe_section(item, encoder), *_data_section(item), *_compute_section(item, encoder),
            *_eval_section(item), *_use_section(item, snippet, library, list(input_notes)), *LIMITS,
            "## Files", "", *(f"- `{f}`" for f in files), ""]
    return front_matter(item, library, license, base_model) + "\n".join(body)
