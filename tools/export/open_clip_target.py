"""Export target open_clip: a CLIP run, both towers, in the hub layout ``open_clip`` reads (as BiomedCLIP is
published: a vision tower and a Hugging Face text tower).

Files: ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg`` and a
``medpretrain`` entry), ``open_clip_model.safetensors`` (the whole model in
open_clip's names), the text transformer alone as a ``transformers`` folder
(``config.json``, ``model.safetensors``) and its tokenizer files. So
``open_clip.create_model_and_transforms("local-dir:PATH")`` and
``open_clip.get_tokenizer("local-dir:PATH")`` load offline, and
``transformers.AutoModel.from_pretrained(PATH)`` gives the text transformer.

open_clip's text adapter reads the text transformer's config from
``text_cfg.hf_model_name``: the export names its own folder (absolute, where it
was written); ``pretrain export push`` uploads it naming the repository
instead, so ``hf-hub:REPO`` reads the same files. A moved folder passes its new
path (the card's snippet).

Vision towers:

- our 2D ViT becomes open_clip's ``VisionTransformer``; exact folds: the patch
  projection's bias goes into the patch rows of the position table (open_clip's
  ``conv1`` has none), a 1-channel kernel becomes three copies of kernel / 3 (open_clip
  takes RGB; a grey image converted to RGB gives the same sum), a missing qkv
  bias becomes zeros; LayerNorm eps 1e-6 is set through ``norm_kwargs``;
- a ``timm:`` backbone (no ``model.kwargs``) becomes open_clip's ``TimmModel`` of
  that registered name, its stem folded to 3 channels the same way.

Refused, with the reason: 3D image towers, ``image_pool: cls+mean`` (open_clip
pools the class token or the patch mean), register tokens, SwiGLU MLPs, last-token
text pooling, text models open_clip's adapter does not know.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pretrain.models.backbones import ModelConfig
from pretrain.models.text_tower import save_transformer

from .source import ExportError, TrainedEncoder

NAME = "open_clip"
CONFIG = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"
LAYER_NORM_EPS = 1e-6
_TEXT_POOLERS = {"cls": "cls_last_hidden_state_pooler", "mean": "mean_pooler"}
_PROBE_TEXTS = ["no acute findings.", "a small nodule in the left upper lobe.", "normal study"]


def _open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise ExportError(f"the open_clip target needs open_clip installed (pip install open_clip_torch): {err}") from None
    return open_clip


def refusal(item: TrainedEncoder) -> str | None:
    """Why this run cannot be an open_clip model, or None (ExportError when open_clip is not installed)."""
    cfg, model = item.cfg, item.cfg.model
    if cfg.objective.name != "clip":
        return (f"open_clip holds image-text models; a {cfg.objective.name} run's encoder exports with "
                "--target timm (2D) or --target monai")
    if model.spatial_dims != 2:
        return "open_clip builds 2D vision towers; export the 3D image tower alone with --target monai"
    if cfg.objective.image_pool not in ("cls", "mean"):
        return (f"objective.image_pool={cfg.objective.image_pool!r}: open_clip's vision towers pool the class token "
                "or the patch mean, not both; export the image tower alone with --target timm")
    if model.in_chans not in (1, 3):
        return f"model.in_chans={model.in_chans}: open_clip's vision towers take RGB (1-channel input folds into it)"
    kind = model.name.partition(":")[0]
    if kind == "monai":
        return f"{model.name} is a MONAI network; open_clip's vision towers are its ViT or a timm model"
    if kind == "timm" and set(model.kwargs) - {"drop_path_rate"}:
        return (f"model.kwargs {sorted(model.kwargs)}: open_clip builds a timm tower from its registered name "
                "alone (TimmModel takes no constructor arguments)")
    if kind == "vit":
        if model.num_register_tokens:
            return f"model.num_register_tokens={model.num_register_tokens}: open_clip's ViT has no register tokens"
        if model.mlp != "gelu":
            return f"model.mlp={model.mlp!r}: open_clip's ViT blocks have a GELU MLP only"
    if cfg.objective.text_pool not in _TEXT_POOLERS:
        return f"objective.text_pool={cfg.objective.text_pool!r}: open_clip's text adapter pools CLS or the mean"
    text = item.objective.text.transformer.config
    arch_dict = _open_clip().hf_configs.arch_dict
    if text.model_type not in arch_dict or getattr(text, "is_encoder_decoder", False):
        return (f"text model type {text.model_type!r}: open_clip's Hugging Face adapter knows encoders of the types "
                f"{', '.join(k for k in arch_dict if k not in ('mt5', 'm2m_100'))}")
    return None


def _rgb_kernel(weight: torch.Tensor) -> torch.Tensor:
    """A 1-channel kernel as three copies of kernel / 3: on a grey image converted to RGB, the same sum."""
    return weight.repeat(1, 3, *([1] * (weight.ndim - 2))) / 3 if weight.shape[1] == 1 else weight


# our block parameter names -> open_clip's (the qkv bias apart: open_clip always has one); LayerScale when present
_BLOCK_NAMES = tuple((f"{ours}.{p}", f"{theirs}.{p}") for ours, theirs in (
    ("norm1", "ln_1"), ("attn.proj", "attn.out_proj"), ("norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj")) for p in ("weight", "bias")) + (
    ("attn.qkv.weight", "attn.in_proj_weight"), ("ls1.gamma", "ls_1.gamma"), ("ls2.gamma", "ls_2.gamma"))


def _vit_visual(state: dict[str, torch.Tensor], model: ModelConfig, proj: torch.Tensor) -> dict[str, torch.Tensor]:
    pos = state["pos_embed"][0].clone()
    pos[1:] += state["patch_embed.proj.bias"]  # conv(x) + b + pos = conv(x) + (pos + b)
    out = {"conv1.weight": _rgb_kernel(state["patch_embed.proj.weight"]), "class_embedding": state["cls_token"][0, 0],
           "positional_embedding": pos, "ln_post.weight": state["norm.weight"], "ln_post.bias": state["norm.bias"],
           "proj": proj.t()}
    for i in range(model.depth):
        a, b = f"blocks.{i}.", f"transformer.resblocks.{i}."
        out.update({b + theirs: state[a + ours] for ours, theirs in _BLOCK_NAMES if a + ours in state})
        out[f"{b}attn.in_proj_bias"] = state.get(f"{a}attn.qkv.bias", torch.zeros(3 * model.embed_dim))
    return out


def _first_conv(name: str) -> str:
    import timm

    return timm.models.get_pretrained_cfg(name).first_conv or ""


def _timm_visual(state: dict[str, torch.Tensor], model: ModelConfig, proj: torch.Tensor) -> dict[str, torch.Tensor]:
    stem = _first_conv(model.name.partition(":")[2]) + ".weight"
    trunk = {k.removeprefix("net."): v for k, v in state.items()}
    if stem in trunk:
        trunk[stem] = _rgb_kernel(trunk[stem])
    return {**{f"trunk.{k}": v for k, v in trunk.items()}, "head.proj.weight": proj}


def _vision_cfg(model: ModelConfig, image_pool: str) -> dict[str, Any]:
    size = list(model.img_size_tuple())
    if model.name.startswith("timm:"):
        timm_name = model.name.partition(":")[2]
        transformer = _first_conv(timm_name).startswith("patch_embed")
        pool = "token" if transformer and image_pool == "cls" else "avg"
        return {"timm_model_name": timm_name, "timm_model_pretrained": False, "timm_pool": pool,
                "timm_proj": "linear", "timm_proj_bias": False, "image_size": size}
    patch = list(model.patch_size_tuple())
    if len(set(patch)) != 1:
        raise ExportError(f"cannot export to open_clip: model.patch_size={patch}: open_clip's ViT takes square patches")
    return {"image_size": size, "patch_size": patch[0], "width": model.embed_dim, "layers": model.depth,
            "head_width": model.embed_dim // model.num_heads, "mlp_ratio": model.mlp_ratio,
            "ls_init_value": model.layer_scale_init, "no_ln_pre": True, "pos_embed_type": "learnable",
            "pool_type": "tok" if image_pool == "cls" else "avg", "final_ln_after_pool": False,
            "norm_kwargs": {"eps": LAYER_NORM_EPS}}


def model_config(item: TrainedEncoder, location: str) -> dict[str, Any]:
    """open_clip's ``model_cfg``; the text tower's config and tokenizer are read from ``location``."""
    obj = item.cfg.objective
    cfg = {"embed_dim": obj.embed_dim, "quick_gelu": False, "custom_text": True,
           "vision_cfg": _vision_cfg(item.cfg.model, obj.image_pool),
           "text_cfg": {"hf_model_name": location, "hf_tokenizer_name": location, "hf_model_pretrained": False,
                        "hf_proj_type": obj.projection, "hf_pooler_type": _TEXT_POOLERS[obj.text_pool],
                        "context_length": obj.max_tokens}}
    if item.objective.logit_bias is not None:
        cfg["init_logit_bias"] = float(item.objective.logit_bias.detach()[0])
    return cfg


def preprocess_config(item: TrainedEncoder) -> dict[str, Any]:
    """open_clip's transform: RGB, resized to the model's size; uint8 / 255 with mean 0 and std 1 is our
    ``range`` normalisation (other intensity handling: the card's snippet, not this transform)."""
    size = list(item.cfg.model.img_size_tuple())
    return {"size": size[0] if len(set(size)) == 1 else size, "mode": "RGB", "mean": [0.0] * 3, "std": [1.0] * 3,
            "interpolation": "bilinear", "resize_mode": "squash", "fill_color": 0}


def weights(item: TrainedEncoder) -> dict[str, torch.Tensor]:
    """The whole CLIP model in open_clip's names (fp32)."""
    clip, model = item.objective, item.cfg.model
    state = {k: v.detach().float() for k, v in clip.image.state_dict().items()}
    proj = clip.image_proj.weight.detach().float()
    visual = (_vit_visual if model.name == "vit" else _timm_visual)(state, model, proj)
    out = {f"visual.{k}": v for k, v in visual.items()}
    transformer = clip.text.transformer
    kept = _kept_text_keys(transformer)
    out.update({f"text.transformer.{k}": v.detach().float() for k, v in transformer.state_dict().items() if k in kept})
    out.update({f"text.proj.{k}": v.detach().float() for k, v in clip.text.proj.state_dict().items()})
    out["logit_scale"] = clip.scale().detach().log().reshape(())  # the clamp the objective applies, folded
    if clip.logit_bias is not None:
        out["logit_bias"] = clip.logit_bias.detach().float().reshape(())
    return {k: v.contiguous() for k, v in out.items()}


def _kept_text_keys(transformer: torch.nn.Module) -> set[str]:
    """Our text transformer's keys that open_clip's adapter builds (it builds BERT-likes without their
    pooler, which our towers never read)."""
    from transformers import AutoModel

    kwargs = {"add_pooling_layer": False} if getattr(transformer, "pooler", None) is not None else {}
    with torch.device("meta"):
        twin = AutoModel.from_config(transformer.config, **kwargs)
    return set(twin.state_dict())


def write(folder: Path, item: TrainedEncoder, location: str, meta: dict[str, Any]) -> list[str]:
    """Write the export's files into ``folder`` (their final home is ``location``; ``meta`` is the
    ``medpretrain`` entry); returns their names."""
    tokenizer = item.objective.data_recipe().tokenizer
    transformer = item.objective.text.transformer
    if tokenizer.pad_token_id is not None and transformer.config.pad_token_id != tokenizer.pad_token_id:
        # open_clip's adapter masks the tokens equal to the config's pad id: it must be the tokenizer's
        transformer.config.pad_token_id = tokenizer.pad_token_id
    save_transformer(transformer, folder)
    tokenizer.save_pretrained(folder)
    save_file(weights(item), str(folder / WEIGHTS), metadata={"format": "pt", "step": str(item.step)})
    config = {"model_cfg": model_config(item, location), "preprocess_cfg": preprocess_config(item), "medpretrain": meta}
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def located(config: dict[str, Any], location: str) -> dict[str, Any]:
    """``open_clip_config.json`` content with the text tower read from ``location`` (a folder or a repo id)."""
    text = {**config["model_cfg"]["text_cfg"], "hf_model_name": location, "hf_tokenizer_name": location}
    return {**config, "model_cfg": {**config["model_cfg"], "text_cfg": text}}


def load(folder: str | Path):
    """(model, tokenizer) as open_clip builds them from the folder wherever it now is (the card's snippet for
    a moved folder)."""
    open_clip = _open_clip()
    folder = str(Path(folder).resolve())
    text_cfg = json.loads(Path(folder, CONFIG).read_text())["model_cfg"]["text_cfg"]
    model = open_clip.create_model(f"local-dir:{folder}", text_cfg={**text_cfg, "hf_model_name": folder})
    return model.eval(), open_clip.get_tokenizer(f"local-dir:{folder}")


def verify(folder: Path, item: TrainedEncoder, tolerance: float) -> float:
    """open_clip's image and text embeddings and logit scale against ours; the largest difference."""
    model, tokenizer = load(folder)
    clip = item.objective
    model_in = item.cfg.model
    x = torch.randn(2, model_in.in_chans, *model_in.img_size_tuple(), generator=torch.Generator().manual_seed(0))
    texts = _PROBE_TEXTS
    with torch.no_grad():
        checks = {
            "image embedding": (model.encode_image(x.expand(-1, 3, *x.shape[2:]), normalize=True), clip.embed_images(x)),
            "text embedding": (model.encode_text(tokenizer(texts), normalize=True), clip.embed_texts(texts)),
            "logit scale": (model.logit_scale.exp().reshape(1), clip.scale().reshape(1)),
        }
    worst = 0.0
    for name, (theirs, ours) in checks.items():
        if theirs.shape != ours.shape:
            raise ExportError(f"open_clip export: its {name} has shape {tuple(theirs.shape)}, ours {tuple(ours.shape)}")
        diff = (theirs.float() - ours.float()).abs().max().item() / (ours.abs().max().item() if "scale" in name else 1)
        if not diff <= tolerance:
            raise ExportError(f"open_clip export: its {name} differs from the trained model's by {diff:.3g} "
                              f"(> {tolerance})")
        worst = max(worst, diff)
    return worst


# --- medpretrain reads its own export back (pretrain eval on an export folder) ----------------------------------

def image_tower_model(meta_model: dict[str, Any]) -> dict[str, Any]:
    """Our image tower's model config for reading the export back: the patch bias lives in the position table
    now, which a learned table resamples with it (a sincos one would be recomputed without it)."""
    return {**meta_model, "pos_embed": "learned"} if meta_model.get("name", "vit") == "vit" else dict(meta_model)


def to_ours(folder: Path, model: ModelConfig) -> dict[str, torch.Tensor]:
    """The image tower's weights in our names (the patch bias zero: it is folded into the position table)."""
    weights = {k.removeprefix("visual."): v for k, v in load_file(str(folder / WEIGHTS)).items()
               if k.startswith("visual.")}
    shrink = (lambda w: w.sum(dim=1, keepdim=True)) if model.in_chans == 1 else (lambda w: w)
    if model.name != "vit":
        stem = _first_conv(model.name.partition(":")[2]) + ".weight"
        trunk = {f"net.{k.removeprefix('trunk.')}": v for k, v in weights.items() if k.startswith("trunk.")}
        if f"net.{stem}" in trunk:
            trunk[f"net.{stem}"] = shrink(trunk[f"net.{stem}"])
        return trunk
    out = {"cls_token": weights["class_embedding"].view(1, 1, -1), "pos_embed": weights["positional_embedding"][None],
           "patch_embed.proj.weight": shrink(weights["conv1.weight"]),
           "patch_embed.proj.bias": torch.zeros(model.embed_dim),
           "norm.weight": weights["ln_post.weight"], "norm.bias": weights["ln_post.bias"]}
    for i in range(model.depth):
        a, b = f"blocks.{i}.", f"transformer.resblocks.{i}."
        out.update({a + ours: weights[b + theirs] for ours, theirs in _BLOCK_NAMES if b + theirs in weights})
        if model.qkv_bias:
            out[f"{a}attn.qkv.bias"] = weights[f"{b}attn.in_proj_bias"]
    return out


def snippet(repo: str, item: TrainedEncoder, config: dict[str, Any]) -> str:
    model = item.cfg.model
    size = ", ".join(map(str, model.img_size_tuple()))
    grey = model.in_chans == 1
    feed = "x.expand(-1, 3, -1, -1)" if grey else "x"
    return "\n".join([
        "```python",
        "import open_clip, torch",
        "",
        f'model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:{repo}")',
        f'tokenizer = open_clip.get_tokenizer("hf-hub:{repo}")',
        "model.eval()",
        "",
        f"x = torch.randn(1, {model.in_chans}, {size})  # (B, C, H, W), intensities normalised as under Input",
        "with torch.no_grad():",
        f"    image = model.encode_image({feed}, normalize=True)"
        + ("  # grey: the same image in R, G and B" if grey else ""),
        '    text = model.encode_text(tokenizer(["no acute findings."]), normalize=True)',
        "    logits = model.logit_scale.exp() * image @ text.T"
        + (" + model.logit_bias" if "init_logit_bias" in config["model_cfg"] else ""),
        "```",
        "",
        "From a downloaded or moved folder (offline, `HF_HUB_OFFLINE=1`): open_clip reads the text tower's "
        "config from `text_cfg.hf_model_name`, so name the folder there:",
        "",
        "```python",
        "import json, open_clip",
        "",
        'path = "/path/to/export"',
        'text_cfg = json.load(open(f"{path}/open_clip_config.json"))["model_cfg"]["text_cfg"]',
        'model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}", '
        'text_cfg={**text_cfg, "hf_model_name": path})',
        'tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")',
        "```",
        "",
        "The text transformer alone (without the projection, which is in `open_clip_model.safetensors`):",
        "",
        "```python",
        "from transformers import AutoModel, AutoTokenizer",
        "",
        f'text_model = AutoModel.from_pretrained("{repo}")  # or the folder',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        "```",
        "",
    ])


def input_notes(item: TrainedEncoder) -> list[str]:
    """What the card says about feeding images through open_clip's RGB-only preprocessing."""
    intensity = item.cfg.data.intensity
    lines = ["open_clip's `preprocess` converts every image to RGB and resizes it (squash, bilinear) to "
             f"{list(item.cfg.model.img_size_tuple())}; its mean 0 / std 1 leaves `ToTensor`'s scaling (8-bit / 255)."]
    if item.cfg.model.in_chans == 1:
        lines.append("The vision tower was trained on 1-channel images: its patch kernel is stored as three "
                     "copies of kernel / 3, so a grey image given as RGB (R = G = B, what `preprocess` makes of "
                     "a grey PIL image) gives the trained features (to float rounding).")
    if intensity == "range":
        lines.append("For 8-bit images that is this run's normalisation (`range`); 16-bit images must be "
                     "scaled by 1 / 65535 yourself.")
    else:
        lines.append(f"This run normalised with `{intensity}`, which `preprocess` cannot do: normalise the tensor "
                     "as under Input and call `encode_image` on it.")
    return lines

