"""Image–report contrastive pretraining (CLIP; SigLIP's sigmoid variant) for 2D images and 3D volumes.

An image tower (any backbone: our ViT, ``timm:``, ``monai:``) and a Hugging
Face text tower are projected to one embedding width and trained so that an
image and its report are nearest among the global batch
(``pretrain.losses.infonce_loss`` / ``siglip_loss``: features gathered over
ranks, each rank its own rows). Reports are split into sentences and a few
are sampled per step; samples with a label and no report get a prompt from
``prompt_templates`` (UniMed-CLIP), so labelled and reported data mix.
Positives are pairs with equal pair ids: each sample with its own text by
default, all samples sharing ``meta[pair_by]`` (a study), and every sample of a
class with that class's prompts.

With ``train.grad_accum`` = M > 1 the loss spans all M micro-batches of a step
(open_clip's ``accum_freq``): a no-grad pass caches every micro-batch's
features, then each micro-batch is re-encoded with gradients (with the RNG of
its first pass, so dropout matches) and the loss over the whole cache is
back-propagated through it alone; the M backward passes add up to the gradient
of one batch of M x B per rank. FLIP (``mask_ratio``) drops image patches of
a ViT for speed.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config.registry import register_objective
from pretrain.config.typed import ConfigError, check_fraction_pair
from pretrain.data.transforms import augmented_view, sample_rng
from pretrain.losses.infonce_loss import infonce_loss
from pretrain.losses.siglip_loss import siglip_loss
from pretrain.models.backbones import build_backbone
from pretrain.models.encoder import eval_mode, pooled_width
from pretrain.models.text_tower import TextTower, load_tokenizer
from pretrain.objectives.base import BuildContext, DataRecipe, EvalBundle, Objective, load_init_weights

NAME = "clip"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass
class Config:
    name: str = NAME  # "clip": image–text contrastive pretraining (this section's schema)
    text_model: str = ""  # transformers encoder: a local folder (offline) or a hub name; its tokenizer too
    text_pool: Literal["cls", "mean", "last"] = "cls"  # text token pooling (last: decoder-style models)
    embed_dim: int = 512  # shared embedding width of both projections
    projection: Literal["linear", "mlp"] = "linear"  # text projection head
    image_pool: Literal["cls", "mean", "cls+mean"] = "cls"  # image token pooling before its projection
    loss: Literal["infonce", "siglip"] = "infonce"  # symmetric softmax InfoNCE, or SigLIP's pairwise sigmoid
    init_temperature: float | None = None  # logit scale starts at 1/T; None: 0.07 (InfoNCE), 0.1 (SigLIP)
    max_logit_scale: float = 100.0  # the learnable scale exp(s) is clamped to [1, this] (open_clip: 100)
    init_logit_bias: float = -10.0  # SigLIP's learnable bias b (unused by InfoNCE)
    freeze_text: bool = False  # keep the whole text transformer fixed (its projection trains)
    freeze_text_layers: int = 0  # keep the embeddings (1) and that many more lower layers fixed
    text_lr_scale: float = 1.0  # lr multiplier of the text transformer (a pretrained tower wants less)
    text_dropout: float | None = None  # replaces the text model's dropout probabilities; None: its own
    lock_image: bool = False  # LiT: the image tower is fixed (e.g. from init_from); its projection trains
    init_from: str = ""  # image-tower weights: our run / checkpoint / export, or a timm-format state dict
    max_tokens: int = 77  # tokens per text, truncated
    sentences: int = 0  # sentences sampled per report per step (in report order); 0: the whole report
    prompt_templates: list[str] = field(default_factory=lambda: ["{}"])  # for labelled samples without a report
    pair_by: str = ""  # meta key whose equal values make positives (e.g. a study id); "": each sample alone
    class_prompts: str = ""  # zero-shot: JSON {class name: [prompts]}; "": prompt_templates on the class names
    mask_ratio: float = 0.0  # FLIP: fraction of image patches dropped while training (ViT only)
    crop_scale: tuple[float, float] = (0.5, 1.0)  # random resized crop: (low, high) area/volume fraction kept
    flip_axes: list[int] = field(default_factory=list)  # spatial axes flipped at random (reports may name sides)
    accum_cache: bool = True  # with train.grad_accum > 1: one loss over all micro-batches of a step

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"config key 'objective.mask_ratio' must be in [0, 1), got {self.mask_ratio}")
        if self.max_logit_scale < 1.0:
            raise ConfigError(f"config key 'objective.max_logit_scale' must be >= 1, got {self.max_logit_scale}")
        if self.init_temperature is not None and not 0.0 < self.init_temperature <= 1.0:
            raise ConfigError(f"config key 'objective.init_temperature' must be in (0, 1], got {self.init_temperature}")
        if self.max_tokens < 2:
            raise ConfigError(f"config key 'objective.max_tokens' must be >= 2, got {self.max_tokens}")
        check_fraction_pair("objective.crop_scale", self.crop_scale)
        for t in self.prompt_templates:
            if t.count("{}") != 1:
                raise ConfigError(f"config key 'objective.prompt_templates': {t!r} needs exactly one '{{}}' "
                                  "for the class name")


def pair_id(value: str) -> int:
    """A stable 63-bit id of a string (the same on every rank, run and machine)."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little") >> 1


def split_sentences(report: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(report) if s.strip()]


class CLIPRecipe(DataRecipe):
    """Image crop and flips (and FLIP noise); the text: sampled report sentences or a class prompt, tokenised."""

    def __init__(self, cfg: Config, img_size: tuple[int, ...], in_chans: int, intensity: str,
                 num_patches: int | None) -> None:
        self.cfg, self.img_size, self.in_chans, self.intensity = cfg, img_size, in_chans, intensity
        self.num_patches = num_patches  # FLIP: per-patch noise that decides the kept patches
        self._tokenizer = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}  # each worker loads its own: the pickle stays small

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.cfg.text_model)
        return self._tokenizer

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, max_length=self.cfg.max_tokens, truncation=True, padding="max_length",
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def caption(self, sample: dict[str, Any], rng: np.random.Generator) -> tuple[str, int]:
        """(text, pair id): sentences of the report, or a prompt from the label when there is none."""
        meta = sample.get("meta") or {}
        report = (sample.get("text") or "").strip()
        if report:
            sentences = split_sentences(report)
            n = self.cfg.sentences
            if 0 < n < len(sentences):
                sentences = [sentences[i] for i in sorted(rng.choice(len(sentences), size=n, replace=False))]
            group = meta.get(self.cfg.pair_by) if self.cfg.pair_by else None
            return " ".join(sentences), pair_id(f"pair:{group}" if group is not None else f"key:{sample['__key__']}")
        name = meta.get("label_name") or (None if sample.get("label") is None else str(sample["label"]))
        if name is None:
            raise ValueError(f"{sample.get('__url__', '?')}: sample {sample['__key__']!r} has neither a report "
                             "(.txt) nor a label to make a prompt from")
        template = self.cfg.prompt_templates[int(rng.integers(len(self.cfg.prompt_templates)))]
        return template.format(name), pair_id(f"class:{name}")

    def whole_view_size(self) -> tuple[int, ...]:
        return tuple(self.img_size)

    def transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        rng = sample_rng(sample)
        x = augmented_view(sample, rng, self.img_size, self.in_chans, self.intensity, self.cfg.crop_scale,
                           self.cfg.flip_axes)
        text, pid = self.caption(sample, rng)
        tokens = self.tokenize([text])
        out = {"image": x.contiguous(), "input_ids": tokens["input_ids"][0], "attention_mask": tokens["attention_mask"][0],
               "pair_id": torch.tensor(pid, dtype=torch.int64)}
        if self.num_patches:
            out["mask_noise"] = torch.from_numpy(rng.random(self.num_patches, dtype="float32"))
        return out

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class CLIP(Objective):
    def __init__(self, run_cfg, ctx: BuildContext) -> None:
        super().__init__(ctx)
        cfg: Config = run_cfg.objective
        self.cfg = cfg
        if not cfg.text_model:
            raise ConfigError("config key 'objective.text_model': give a transformers model folder (or hub name)")
        self.image = build_backbone(run_cfg.model)
        self.img_size = run_cfg.model.img_size_tuple()
        self.len_keep = None
        if cfg.mask_ratio > 0:
            if not self.image.supports_token_mask:
                raise ConfigError(f"config key 'objective.mask_ratio': FLIP drops ViT patch tokens; "
                                  f"{run_cfg.model.name!r} has none (set it to 0 or model.name=vit)")
            n = math.prod(self.image.grid_size(self.img_size))
            self.len_keep = max(1, int(round(n * (1 - cfg.mask_ratio))))
        self.init_report = load_init_weights(self.image, cfg.init_from, run_cfg.model.name)
        if cfg.lock_image:
            self.image.requires_grad_(False)
        self.image_proj = nn.Linear(pooled_width(self.image, cfg.image_pool), cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=self.image_proj.in_features ** -0.5)
        self.text = TextTower(cfg.text_model, embed_dim=cfg.embed_dim, pool=cfg.text_pool, projection=cfg.projection,
                              freeze=cfg.freeze_text, freeze_layers=cfg.freeze_text_layers, dropout=cfg.text_dropout)
        temperature = cfg.init_temperature or (0.1 if cfg.loss == "siglip" else 0.07)
        # shape (1,), not 0-d: DeepSpeed broadcasts parameters as bytes, which a 0-d tensor cannot be viewed as
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / temperature)))
        self.logit_bias = nn.Parameter(torch.full((1,), cfg.init_logit_bias)) if cfg.loss == "siglip" else None
        self.grad_accum, self.batch_size = run_cfg.train.grad_accum, run_cfg.data.batch_size
        self._recipe = CLIPRecipe(cfg, self.img_size, run_cfg.model.in_chans, run_cfg.data.intensity,
                                  math.prod(self.image.grid_size(self.img_size)) if self.len_keep else None)

    def data_recipe(self) -> CLIPRecipe:
        return self._recipe

    # --- device side ----------------------------------------------------------------------
    def scale(self) -> torch.Tensor:
        """exp(s), clamped to [1, max_logit_scale]: the clamp bounds the logits whatever the optimizer does."""
        return self.logit_scale.float().clamp(0.0, math.log(self.cfg.max_logit_scale)).exp()[0]

    def _image_tokens(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        if keep is None:
            return self.image.forward_features(x)
        return self.image.forward_features(x, keep_idx=keep)

    def image_embedding(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """(B, embed_dim) L2-normalised, fp32; ``noise`` (FLIP) picks the kept patches."""
        keep = None if noise is None else torch.argsort(noise.float(), dim=1)[:, : self.len_keep]
        x = x.to(self.compute_dtype)
        if self.cfg.lock_image:
            with torch.no_grad():
                tokens = self._image_tokens(x, keep)
        else:
            tokens = self._image_tokens(x, keep)
        return F.normalize(self.image_proj(self.image.pool(tokens, self.cfg.image_pool)).float(), dim=-1)

    def text_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(input_ids, attention_mask).float(), dim=-1)

    def contrastive_loss(self, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor,
                         scalar_grads: bool = True) -> torch.Tensor:
        """The configured loss; without ``scalar_grads`` the scale and bias are constants (cache passes after
        the first, so that they, like every feature, get their gradient once)."""
        group = self.ctx.group if self.ctx.world_size > 1 else None
        scale = self.scale() if scalar_grads else self.scale().detach()
        if self.cfg.loss == "siglip":
            bias = self.logit_bias.float()[0]
            return siglip_loss(image, text, scale, bias if scalar_grads else bias.detach(), ids, ids, group=group)
        return infonce_loss(image, text, scale, ids, ids, group=group)

    def forward(self, batch: dict[str, Any], features_only: bool = False,  # type: ignore[override]
                cache: dict[str, list[torch.Tensor]] | None = None, index: int = 0) -> dict[str, torch.Tensor]:
        """The loss of this micro-batch's pairs; with ``cache`` (the no-grad features of every micro-batch of
        the step), the loss over all of them with this one's features (``index``) carrying gradients."""
        image = self.image_embedding(batch["image"], batch.get("mask_noise") if self.training else None)
        text = self.text_embedding(batch["input_ids"], batch["attention_mask"])
        ids = batch["pair_id"]
        if features_only:
            return {"image": image, "text": text, "pair_id": ids}
        all_image, all_text, all_ids = image, text, ids
        if cache is not None:
            swap = lambda xs, x: torch.cat([*xs[:index], x, *xs[index + 1:]])  # noqa: E731
            all_image, all_text, all_ids = swap(cache["image"], image), swap(cache["text"], text), swap(cache["pair_id"], ids)
        loss = self.contrastive_loss(all_image, all_text, all_ids, scalar_grads=cache is None or index == 0)
        out = {"loss": loss, "logit_scale": self.scale().detach(),
               "_embed/image/proj": image.detach(), "_embed/text/proj": text.detach()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias.detach().float()[0]
        return out

    def train_step(self, micro_batches, stepper):
        """One loss over every micro-batch of the step (see the module docstring)."""
        micro_batches = list(micro_batches)
        if len(micro_batches) == 1 or not self.cfg.accum_cache:
            return super().train_step(micro_batches, stepper)
        device = micro_batches[0]["image"].device
        states, feats = [], []
        with torch.no_grad():
            for batch in micro_batches:
                states.append(_rng_state(device))
                feats.append(stepper.forward(batch, features_only=True))
        cache = {k: [f[k].detach() for f in feats] for k in ("image", "text", "pair_id")}
        outputs = []
        for j, batch in enumerate(micro_batches):
            _set_rng_state(states[j], device)
            out = stepper.forward(batch, cache=cache, index=j)
            # The engine divides each backward by the M micro-batches; each carries a disjoint part of one loss.
            if stepper.backward(out["loss"] * len(micro_batches), out):
                outputs.append(out)
        return outputs

    # --- hooks ----------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        from pretrain.optim.param_groups import decay_groups

        text = list(self.text.transformer.parameters())
        groups = decay_groups(self, exclude=text)
        groups += decay_groups(self.text.transformer, prefix="text", lr_scale=self.cfg.text_lr_scale)
        return groups

    @torch.no_grad()
    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        with eval_mode(self):
            return self.image_embedding(x)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self._recipe.tokenize(texts)
        device = self.logit_scale.device
        with eval_mode(self):
            return self.text_embedding(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))

    def class_prompts(self, class_names: list[str]) -> dict[str, list[str]]:
        """Zero-shot prompts per class: from ``class_prompts`` (JSON) or the templates on the class names."""
        if self.cfg.class_prompts:
            path = Path(self.cfg.class_prompts)
            try:
                given = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"objective.class_prompts {str(path)!r}: {e}") from None
            missing = [c for c in class_names if not given.get(c)]
            if missing:
                raise ValueError(f"objective.class_prompts {str(path)!r} has no prompts for classes {missing}")
            return {c: list(given[c]) for c in class_names}
        return {c: [t.format(c) for t in self.cfg.prompt_templates] for c in class_names}

    def eval_bundle(self) -> EvalBundle:
        return EvalBundle({"image": self.image}, pool=self.cfg.image_pool, text_encoder=self.text,
                          tokenizer=self._recipe.tokenizer, embed_image=self.embed_images,
                          embed_text=self.embed_texts, class_prompts=self.class_prompts)

    def tokens_per_sample(self) -> int:
        n = self.len_keep or math.prod(self.image.grid_size(self.img_size))
        return n + getattr(self.image, "num_prefix_tokens", 0) + self.cfg.max_tokens

    def flops_per_sample(self) -> float:
        """Both towers forward + backward, projections, the logits against the global batch; a locked or
        frozen tower runs forward only (its projection then back-propagates into its weights alone); with the
        accumulation cache, one more forward of both towers."""
        linear = lambda module: sum(2 * m.in_features * m.out_features  # noqa: E731
                                    for m in module.modules() if isinstance(m, nn.Linear))
        image_proj, text_proj = linear(self.image_proj), linear(self.text.proj)
        image = (self.image.forward_flops if self.cfg.lock_image else self.image.train_flops)(
            self.img_size, num_tokens_kept=self.len_keep) + (2 if self.cfg.lock_image else 3) * image_proj
        text_fwd = self.text.forward_flops(self.cfg.max_tokens)
        if self.cfg.freeze_text:  # backward: the first projection layer's weights, both grads for the later ones
            first = linear(next(m for m in self.text.proj.modules() if isinstance(m, nn.Linear)))
            text = text_fwd + first + 2 * (text_proj - first)
        else:
            text = 3 * text_fwd
        cache = self.grad_accum > 1 and self.cfg.accum_cache
        columns = self.batch_size * self.ctx.world_size * (self.grad_accum if cache else 1)
        logits = 3 * (2 if self.cfg.loss == "infonce" else 1) * 2 * columns * self.cfg.embed_dim
        extra = self.image.forward_flops(self.img_size, num_tokens_kept=self.len_keep) + image_proj + text_fwd \
            if cache else 0.0
        return float(image + text + self.text.unused_flops() + logits + extra)


def build(run_cfg, ctx: BuildContext) -> CLIP:
    return CLIP(run_cfg, ctx)


register_objective(NAME, Config, build)
