"""Supervised fine-tuning of a pretrained encoder end to end: the evaluation suite's ``finetune`` protocol.

The recipe of MAE's and BEiT's fine-tuning, which the thorax-MAE study (Xiao et
al. 2023) carried over to chest X-rays: every weight trains, a linear head on
the pooled tokens, layer-wise lr decay (block i of L gets
``layer_decay ** (L + 1 - i)`` of the lr; the embeddings the smallest share),
stochastic depth (``model.drop_path_rate``), random resized crops, label
smoothing, AdamW with warm-up and cosine decay. It runs through the same
trainer and DeepSpeed engine as pretraining, so it checkpoints and resumes the
same way and exactly.

Labels: single-label samples carry a ``.cls`` member (cross-entropy);
multi-label ones carry ``meta["labels"]``, a 0/1 vector of findings (binary
cross-entropy per finding). ``class_weights`` counter class imbalance.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config.registry import register_objective
from pretrain.config.typed import ConfigError, check_fraction_pair
from pretrain.data.transforms import augmented_view, sample_rng
from pretrain.models.backbones import build_backbone
from pretrain.models.encoder import pooled_width
from pretrain.objectives.base import BuildContext, DataRecipe, EvalBundle, Objective, load_init_weights
from pretrain.optim.param_groups import decay_groups, layer_decay_groups

NAME = "finetune"


@dataclass
class Config:
    name: str = NAME  # "finetune": supervised end-to-end fine-tuning (this section's schema)
    init_from: str = ""  # starting weights: our run / checkpoint / export, or a timm-format file; "" = random init
    num_classes: int = 0  # classes (single-label) or findings (multi-label); required, >= 2 single-label
    multi_label: bool = False  # targets are meta 'labels' (0/1 per finding, binary cross-entropy); else the .cls label
    pool: Literal["cls", "mean", "cls+mean"] = "cls"  # token pooling the head reads
    layer_decay: float = 0.75  # lr of ViT block i of L: layer_decay ** (L + 1 - i); 1 = no decay (CNNs: ignored)
    label_smoothing: float = 0.1  # single-label cross-entropy smoothing
    class_weights: list[float] = field(default_factory=list)  # per class (or per finding's positives); [] = equal
    head_init_std: float = 2e-5  # the head starts near zero: early gradients do not wreck the pretrained features
    crop_scale: tuple[float, float] = (0.5, 1.0)  # random resized crop: (low, high) area/volume fraction kept
    flip_axes: list[int] = field(default_factory=list)  # spatial axes flipped at random; [] keeps laterality

    def __post_init__(self) -> None:
        if self.num_classes < (1 if self.multi_label else 2):
            raise ConfigError(f"config key 'objective.num_classes' must be >= {1 if self.multi_label else 2}"
                              f"{' (findings)' if self.multi_label else ' (classes)'}, got {self.num_classes}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"config key 'objective.layer_decay' must be in (0, 1], got {self.layer_decay}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"config key 'objective.label_smoothing' must be in [0, 1), got {self.label_smoothing}")
        if self.class_weights and (len(self.class_weights) != self.num_classes
                                   or not all(math.isfinite(w) and w > 0 for w in self.class_weights)):
            raise ConfigError(f"config key 'objective.class_weights' must be {self.num_classes} positive numbers, "
                              f"got {self.class_weights}")
        check_fraction_pair("objective.crop_scale", self.crop_scale)


def sample_target(sample: dict[str, Any], num_classes: int, multi_label: bool) -> torch.Tensor:
    """The training target of one sample: a class index, or a (num_classes,) 0/1 float vector."""
    where = f"{sample.get('__url__', '?')}: sample {sample['__key__']!r}"
    if multi_label:
        labels = (sample.get("meta") or {}).get("labels")
        if labels is None or len(labels) != num_classes:
            raise ValueError(f"{where}: multi-label fine-tuning needs meta 'labels' with {num_classes} entries, "
                             f"got {labels!r}")
        return torch.tensor([float(v) for v in labels], dtype=torch.float32)
    label = sample.get("label")
    if label is None or not 0 <= int(label) < num_classes:
        raise ValueError(f"{where}: fine-tuning needs a .cls label in 0..{num_classes - 1}, got {label!r}")
    return torch.tensor(int(label))


class FinetuneRecipe(DataRecipe):
    def __init__(self, cfg: Config, img_size: tuple[int, ...], in_chans: int, intensity: str) -> None:
        self.cfg, self.img_size, self.in_chans, self.intensity = cfg, img_size, in_chans, intensity

    def whole_view_size(self) -> tuple[int, ...]:
        return tuple(self.img_size)

    def transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        x = augmented_view(sample, sample_rng(sample), self.img_size, self.in_chans, self.intensity,
                           self.cfg.crop_scale, self.cfg.flip_axes)
        return {"image": x.contiguous(), "target": sample_target(sample, self.cfg.num_classes, self.cfg.multi_label)}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {"image": torch.stack([s["image"] for s in samples]), "target": torch.stack([s["target"] for s in samples])}


_EMBEDDING = re.compile(r"^(cls_token|reg_token|register_tokens|pos_embed|patch_embed)")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class Finetune(Objective):
    def __init__(self, run_cfg, ctx: BuildContext) -> None:
        super().__init__(ctx)
        self.cfg: Config = run_cfg.objective
        self.backbone = build_backbone(run_cfg.model)
        self.init_report = load_init_weights(self.backbone, self.cfg.init_from, run_cfg.model.name)
        self.img_size = tuple(run_cfg.model.img_size_tuple())
        self.head = nn.Linear(pooled_width(self.backbone, self.cfg.pool), self.cfg.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=self.cfg.head_init_std)
        nn.init.zeros_(self.head.bias)
        weights = torch.tensor(self.cfg.class_weights or [1.0] * self.cfg.num_classes, dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)
        self._recipe = FinetuneRecipe(self.cfg, self.img_size, run_cfg.model.in_chans, run_cfg.data.intensity)

    def data_recipe(self) -> FinetuneRecipe:
        return self._recipe

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) logits of images (B, C, *spatial)."""
        tokens = self.backbone.forward_features(images.to(self.compute_dtype))
        return self.head(self.backbone.pool(tokens, self.cfg.pool)).float()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (softmax), or per-finding probabilities (sigmoid) when multi-label."""
        z = self.logits(images)
        return z.sigmoid() if self.cfg.multi_label else z.softmax(-1)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        z, y = self.logits(batch["image"]), batch["target"]
        if self.cfg.multi_label:
            y = y.float()
            pos_weight = self.class_weights if self.cfg.class_weights else None
            loss = F.binary_cross_entropy_with_logits(z, y, pos_weight=pos_weight)
            acc = ((z > 0).float() == y).float().mean()
        else:
            weight = self.class_weights if self.cfg.class_weights else None
            loss = F.cross_entropy(z, y, weight=weight, label_smoothing=self.cfg.label_smoothing)
            acc = (z.argmax(-1) == y).float().mean()
        return {"loss": loss, "train_accuracy": acc.detach()}

    def param_groups(self) -> list[dict[str, Any]]:
        blocks = getattr(self.backbone, "blocks", None)
        if blocks is None or self.cfg.layer_decay == 1.0:  # a CNN has no blocks to rank: one lr for all
            return decay_groups(self)
        depth = len(blocks)

        def layer_of(name: str) -> int:  # embeddings 0, block i -> i + 1, final norm and head depth + 1
            if not name.startswith("backbone."):
                return depth + 1
            rest = name[len("backbone."):]
            if _EMBEDDING.match(rest):
                return 0
            m = _BLOCK.match(rest)
            return int(m.group(1)) + 1 if m else depth + 1

        return layer_decay_groups(self, layer_of, depth + 1, self.cfg.layer_decay)

    def eval_bundle(self) -> EvalBundle:
        return EvalBundle({"encoder": self.backbone}, pool=self.cfg.pool)

    def tokens_per_sample(self) -> int:
        grid = self.backbone.grid_size(self.img_size)
        return math.prod(grid) + self.backbone.num_prefix_tokens

    def flops_per_sample(self) -> float:
        """The encoder forward + backward, and the head's (2 FLOPs per MAC, backward twice the forward)."""
        return float(self.backbone.train_flops(self.img_size) + 3 * 2 * self.head.in_features * self.head.out_features)


def build(run_cfg, ctx: BuildContext) -> Finetune:
    return Finetune(run_cfg, ctx)


register_objective(NAME, Config, build)
