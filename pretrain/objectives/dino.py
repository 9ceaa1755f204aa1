"""DINOv2-style self-distillation (Oquab et al. 2023) for 2D images and 3D volumes.

A student ViT sees every crop of an image (global and local, its global crops
partly masked); an EMA teacher sees the unmasked global crops. Three losses:

- DINO: the student's class-token prototypes of each crop match the
  teacher's of every other global crop (``pretrain.losses.dino_loss``);
- iBOT: at masked patches the student's patch prototypes match the
  teacher's of the visible patch (``pretrain.losses.ibot_loss``);
- KoLeo: spreads the student's class tokens of a batch over the sphere
  (``pretrain.losses.koleo_loss``).

Teacher targets are centred by Sinkhorn-Knopp (default) or a running softmax
center; the teacher temperature warms up linearly, the student's is fixed;
the EMA momentum follows a cosine from ``momentum_start`` to ``momentum_end``.
The teacher is an fp32 EMA of the student under every ZeRO stage
(``pretrain.models.ema``); it is the encoder exported and the headline of
kNN evaluation (the student is evaluated too).

Any backbone of ``pretrain.models.backbones`` trains: our ViT, ``timm:`` 2D
models (a ResNet as in DINO v1), ``monai:`` 3D networks. iBOT masks patch
tokens and so needs the ViT; with another backbone set ``ibot_weight: 0``.

Loss weighting (``loss_weighting``): ``dinov2`` (default) is DINOv2's: KoLeo
summed over the global crops, iBOT's per-image means summed and divided by
the number of global-crop images. ``mean`` averages KoLeo over the global
crops and iBOT over the images that have masked patches.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from pretrain.data.block_mask import sample_mask
from pretrain.data.multicrop import MultiCropSpec, collate_crops, multi_crop
from pretrain.config.registry import register_objective
from pretrain.config.typed import ConfigError
from pretrain.data.transforms import sample_rng
from pretrain.losses.centering import RunningCenter, sinkhorn_knopp
from pretrain.losses.dino_loss import dino_loss
from pretrain.losses.ibot_loss import ibot_loss
from pretrain.losses.koleo_loss import koleo_loss
from pretrain.models.ema import EMATeacher, merge_rank_states
from pretrain.models.backbones import build_backbone
from pretrain.models.heads import DINOHead
from pretrain.objectives.base import (BuildContext, DataRecipe, EvalBundle, Objective, check_view_fits_patches,
                                      load_init_weights)
from pretrain.optim.schedules import Schedule

NAME = "dino"


@dataclass
class Config:
    name: str = NAME  # "dino": DINOv2-style self-distillation (this section's schema)
    crops: MultiCropSpec = field(default_factory=MultiCropSpec)  # multi-crop views and their augmentations
    # heads
    prototypes: int = 4096  # prototypes K of the DINO head: the classes of the class-token targets
    head_hidden_dim: int = 2048  # hidden width of each head's MLP
    head_bottleneck_dim: int = 256  # L2-normalised bottleneck that is compared with the prototypes (cosine)
    head_layers: int = 3  # linear layers of each head's MLP; 1: a single projection to the bottleneck
    separate_ibot_head: bool = False  # iBOT patch tokens get their own head; False: they share the DINO head
    ibot_prototypes: int = 0  # 0: as many as the DINO head (only used with a separate head)
    # losses
    dino_weight: float = 1.0  # weight of the DINO class-token loss in the total loss
    ibot_weight: float = 1.0  # weight of the iBOT masked-patch loss; 0: no iBOT (required for non-ViT backbones)
    koleo_weight: float = 0.1  # weight of the KoLeo regulariser spreading the student's class tokens
    loss_weighting: Literal["dinov2", "mean"] = "dinov2"  # how KoLeo and iBOT are normalised (module docstring)
    student_temp: float = 0.1  # softmax temperature of the student's prototype logits (fixed)
    teacher_temp: float = 0.07  # teacher softmax temperature after its warm-up
    warmup_teacher_temp: float = 0.04  # teacher temperature at step 0, raised linearly to teacher_temp
    teacher_temp_warmup_fraction: float = 0.3  # teacher temperature warm-up, as a fraction of train.steps
    # teacher-target centering: Sinkhorn-Knopp, or softmax after subtracting an EMA of the logits
    centering: Literal["sinkhorn_knopp", "softmax"] = "sinkhorn_knopp"
    sinkhorn_iterations: int = 3  # Sinkhorn-Knopp normalisation rounds (centering=sinkhorn_knopp only)
    center_momentum: float = 0.9  # EMA momentum of the running center (centering=softmax only)
    # iBOT masks on the student's global crops
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # iBOT: range (uniform) of the hidden fraction of a masked crop
    mask_probability: float = 0.5  # iBOT: probability that a global crop is masked at all
    # teacher
    momentum_start: float = 0.992  # teacher EMA momentum at step 0
    momentum_end: float = 1.0  # teacher EMA momentum at the end (half cosine from momentum_start)
    freeze_last_layer_steps: int = 0  # steps with the heads' prototypes frozen (DINOv2: its first epoch)
    init_from: str = ""  # continued pretraining: our run/checkpoint/export, or a timm-format state dict

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum_start <= self.momentum_end <= 1.0:
            raise ValueError(f"objective.momentum_start <= momentum_end must lie in [0, 1], "
                             f"got {self.momentum_start}, {self.momentum_end}")
        if self.crops.n_global < 2 and self.crops.n_local < 1:
            raise ValueError("objective.crops: DINO needs two views at least (n_global >= 2, or n_local >= 1)")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if getattr(self, name) <= 0:
                raise ValueError(f"objective.{name} must be positive, got {getattr(self, name)}")


def momentum_schedule(cfg: Config) -> Schedule:
    """EMA momentum: a half cosine from ``momentum_start`` to ``momentum_end``."""
    return Schedule(cfg.momentum_start, cfg.momentum_end, "cosine")


def teacher_temp_schedule(cfg: Config) -> Schedule:
    """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp`` over the warm-up fraction, then constant."""
    return Schedule(cfg.teacher_temp, shape="constant", warmup_fraction=cfg.teacher_temp_warmup_fraction,
                    warmup_from=cfg.warmup_teacher_temp)


class _Tower(nn.Module):
    """Backbone and heads: the student, and (a copy) the teacher."""

    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        dim = backbone.embed_dim
        self.backbone = backbone
        self.dino_head = DINOHead(dim, cfg.prototypes, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_layers)
        if cfg.separate_ibot_head:
            self.ibot_head = DINOHead(dim, cfg.ibot_prototypes or cfg.prototypes, cfg.head_hidden_dim,
                                      cfg.head_bottleneck_dim, cfg.head_layers)
        else:
            self.ibot_head = None

    def patch_head(self) -> DINOHead:
        return self.ibot_head if self.ibot_head is not None else self.dino_head


class DINORecipe(DataRecipe):
    """Multi-crop views and, for the ViT, iBOT block masks of the global crops."""

    def __init__(self, cfg: Config, in_chans: int, intensity: str, global_grid: tuple[int, ...] | None) -> None:
        self.cfg, self.in_chans, self.intensity, self.global_grid = cfg, in_chans, intensity, global_grid

    def whole_view_size(self) -> tuple[int, ...]:
        return tuple(self.cfg.crops.global_size)

    def transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        rng = sample_rng(sample)
        views = multi_crop(sample["image"], self.cfg.crops, rng, self.in_chans, self.intensity, key=sample["__key__"])
        if self.global_grid is None:
            return views
        masks = np.stack([sample_mask(self.global_grid, rng, tuple(self.cfg.mask_ratio), self.cfg.mask_probability)
                          for _ in views["global_crops"]])
        return {**views, "masks": torch.from_numpy(masks)}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_crops(samples)
        if self.global_grid is not None:
            # Crop-major like the crops: all samples' mask of global crop 0, then of crop 1, ...
            batch["masks"] = torch.stack([s["masks"] for s in samples], dim=1).flatten(0, 1)
        return batch


class DINO(Objective):
    def __init__(self, run_cfg, ctx: BuildContext) -> None:
        super().__init__(ctx)
        self.cfg: Config = run_cfg.objective
        self.batch_size, self.total_steps = run_cfg.data.batch_size, run_cfg.train.steps
        crops = self.cfg.crops
        backbone = build_backbone(run_cfg.model)
        self.use_ibot = self.cfg.ibot_weight > 0
        if self.use_ibot and not backbone.supports_token_mask:
            raise ConfigError(f"config key 'objective.ibot_weight': iBOT masks patch tokens, which "
                              f"{run_cfg.model.name!r} has none of; set objective.ibot_weight=0 (or model.name=vit)")
        for name, size in (("global_size", crops.global_size), ("local_size", crops.local_size)):
            check_view_fits_patches(f"objective.crops.{name}", size, backbone)
        self.global_grid = backbone.grid_size(crops.global_size)
        self.prefix = backbone.num_prefix_tokens
        self.init_report = load_init_weights(backbone, self.cfg.init_from, run_cfg.model.name)
        self.student = _Tower(backbone, self.cfg)
        # The teacher starts as the student; it needs no stochastic depth (it never trains).
        self.teacher = copy.deepcopy(self.student)
        for block in getattr(self.teacher.backbone, "blocks", []):
            block.drop_path = nn.Identity()
        self.teacher.requires_grad_(False)
        if self.use_ibot:
            self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim))
            nn.init.normal_(self.mask_token, std=0.02)
        self.ema = EMATeacher(self.student, self.teacher)
        if self.cfg.centering == "softmax":
            self.cls_center = RunningCenter(self.cfg.prototypes, self.cfg.center_momentum)
            self.patch_center = RunningCenter(self.student.patch_head().last_layer_v.shape[0], self.cfg.center_momentum)
        self._schedules = {"momentum": momentum_schedule(self.cfg), "teacher_temp": teacher_temp_schedule(self.cfg)}
        self.teacher_temp = self._schedules["teacher_temp"](0, 1)
        self.momentum = self.cfg.momentum_start
        self._recipe = DINORecipe(self.cfg, run_cfg.model.in_chans, run_cfg.data.intensity,
                                  self.global_grid if self.use_ibot else None)

    def data_recipe(self) -> DINORecipe:
        return self._recipe

    # --- device side ----------------------------------------------------------------------
    def _targets(self, logits: torch.Tensor, center: RunningCenter | None) -> torch.Tensor:
        if center is None:
            return sinkhorn_knopp(logits, self.teacher_temp, self.cfg.sinkhorn_iterations)
        probs = center.probabilities(logits, self.teacher_temp)
        center.update(logits)
        return probs

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        n_global, n_local = self.cfg.crops.n_global, self.cfg.crops.n_local
        dtype = self.compute_dtype
        globals_ = batch["global_crops"].to(dtype)
        batch_size = globals_.shape[0] // n_global
        center = self.cfg.centering == "softmax"
        masks = batch["masks"].bool() if self.use_ibot else None

        with torch.no_grad():
            t_tokens = self.teacher.backbone.forward_features(globals_)
            t_cls = self._targets(self.teacher.dino_head(t_tokens[:, 0]), self.cls_center if center else None)
            if self.use_ibot:
                t_patch_logits = self.teacher.patch_head()(t_tokens[:, self.prefix:][masks])
                t_patch = self._targets(t_patch_logits, self.patch_center if center else None)

        if self.use_ibot:
            s_tokens = self.student.backbone.forward_features(globals_, mask=masks, mask_token=self.mask_token)
        else:
            s_tokens = self.student.backbone.forward_features(globals_)
        s_cls = s_tokens[:, 0]
        student_logits = list(self.student.dino_head(s_cls).chunk(n_global))
        if n_local:
            s_local_cls = self.student.backbone.forward_features(batch["local_crops"].to(dtype))[:, 0]
            student_logits += list(self.student.dino_head(s_local_cls).chunk(n_local))
        loss_dino = dino_loss(student_logits, list(t_cls.chunk(n_global)), self.cfg.student_temp)
        koleo_terms = [koleo_loss(c) for c in s_cls.chunk(n_global)]
        dinov2 = self.cfg.loss_weighting == "dinov2"
        loss_koleo = sum(koleo_terms) if dinov2 else sum(koleo_terms) / n_global
        out = {"dino": loss_dino.detach(), "koleo": loss_koleo.detach(), **self._embeddings(t_tokens, s_tokens),
               # the prototype distributions of the global crops, for the collapse monitor's entropies
               "_dist/teacher/cls_targets": t_cls.detach(),
               "_dist/student/cls_predictions": torch.softmax(
                   torch.cat(student_logits[:n_global]).detach().float() / self.cfg.student_temp, dim=-1)}
        loss = self.cfg.dino_weight * loss_dino + self.cfg.koleo_weight * loss_koleo
        if self.use_ibot:
            s_patch_logits = self.student.patch_head()(s_tokens[:, self.prefix:][masks])
            loss_ibot = ibot_loss(s_patch_logits, t_patch, masks.nonzero()[:, 0], n_global * batch_size,
                                  self.cfg.student_temp, divide_by="batch" if dinov2 else "masked_images")
            loss = loss + self.cfg.ibot_weight * loss_ibot
            out.update(ibot=loss_ibot.detach(), masked_fraction=masks.float().mean())
        return {"loss": loss, **out}

    def _embeddings(self, t_tokens: torch.Tensor, s_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The global crops' class and mean patch tokens of both towers, for the trainer's collapse monitor."""
        return {f"_embed/{tower}/{kind}": value.detach() for tower, tokens in (("teacher", t_tokens), ("student", s_tokens))
                for kind, value in (("cls", tokens[:, 0]), ("patch", tokens[:, self.prefix:].mean(1)))}

    # --- hooks ----------------------------------------------------------------------------
    def schedules(self) -> dict[str, Schedule]:
        return dict(self._schedules)

    def set_schedules(self, step: int, values: dict[str, float]) -> None:
        self.teacher_temp, self.momentum = values["teacher_temp"], values["momentum"]
        frozen = step < self.cfg.freeze_last_layer_steps
        for head in (self.student.dino_head, self.student.ibot_head):
            if head is not None:
                head.freeze_last_layer = frozen

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        self.ema.update(self.momentum)

    def log_scalars(self) -> dict[str, float]:
        return {"dino/last_layer_frozen": float(self.student.dino_head.freeze_last_layer)}

    def eval_bundle(self) -> EvalBundle:
        return EvalBundle({"teacher": self.teacher.backbone, "student": self.student.backbone}, pool="cls")

    def rank_state(self) -> dict[str, Any]:
        return {"ema_teacher": self.ema.state_dict()}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        if "ema_teacher" in state:
            self.ema.load_state_dict(state["ema_teacher"])

    def restore_from_rank_states(self, states: list[dict[str, Any]]) -> set[str]:
        teacher = [s["ema_teacher"] for s in states if "ema_teacher" in s]
        if not teacher:
            return set()
        merged = merge_rank_states(teacher)
        self.teacher.load_state_dict(merged, strict=False)
        return {f"teacher.{name}" for name in merged}

    def _tokens(self, size: tuple[int, ...]) -> int:
        return math.prod(self.student.backbone.grid_size(size)) + self.prefix

    def tokens_per_sample(self) -> int:
        crops = self.cfg.crops
        return crops.n_global * self._tokens(crops.global_size) + crops.n_local * self._tokens(crops.local_size)

    def expected_masked_patches(self) -> float:
        """Masked patches per sample over its global crops (iBOT head inputs), in expectation."""
        if not self.use_ibot:
            return 0.0
        n = math.prod(self.global_grid)
        low, high = self.cfg.mask_ratio
        # each masked crop hides round(ratio * N) >= 1 patches; the mean ratio is exact for a fixed ratio
        return self.cfg.crops.n_global * self.cfg.mask_probability * max(1.0, round((low + high) / 2 * n))

    def flops_per_sample(self) -> float:
        """Student forward + backward on every crop, the teacher's forward on the global crops, their
        heads, and KoLeo's pairwise similarities (matmuls only, as FlopCounterMode counts them)."""
        crops, backbone = self.cfg.crops, self.student.backbone
        student = crops.n_global * backbone.train_flops(crops.global_size)
        if crops.n_local:
            student += crops.n_local * backbone.train_flops(crops.local_size)
        teacher = crops.n_global * backbone.forward_flops(crops.global_size)
        frozen = self.cfg.freeze_last_layer_steps >= self.total_steps  # the prototypes never train
        heads = _head_flops(self.student.dino_head, crops.n_global + crops.n_local, train=True, frozen=frozen)
        heads += _head_flops(self.teacher.dino_head, crops.n_global, train=False)
        masked = self.expected_masked_patches()
        if masked:
            heads += _head_flops(self.student.patch_head(), masked, train=True, frozen=frozen)
            heads += _head_flops(self.teacher.patch_head(), masked, train=False)
        koleo = crops.n_global * 2 * self.batch_size * backbone.embed_dim  # (B x D) @ (D x B) per crop, per sample
        return student + teacher + heads + koleo


def _head_flops(head: DINOHead, tokens: float, *, train: bool, frozen: bool = False) -> float:
    """A DINO head on ``tokens`` inputs: its linear layers and the prototype matmul; the backward
    computes input and weight gradients (no weight gradient for frozen prototypes)."""
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    mlp = sum(2 * m.in_features * m.out_features for m in linears) * tokens
    protos = 2 * head.last_layer_v.numel() * tokens
    if not train:
        return mlp + protos
    return 3 * mlp + (2 if frozen else 3) * protos


def build(run_cfg, ctx: BuildContext) -> DINO:
    return DINO(run_cfg, ctx)


register_objective(NAME, Config, build)
