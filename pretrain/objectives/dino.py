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
from pretrain.data.transforms import sample_rng
from pretrain.losses.centering import RunningCenter, sinkhorn_knopp
from pretrain.losses.dino_loss import dino_loss
from pretrain.losses.ibot_loss import ibot_loss
from pretrain.losses.koleo_loss import koleo_loss
from pretrain.models.ema import EMATeacher, merge_rank_states
from pretrain.models.heads import DINOHead
from pretrain.models.vit import VisionTransformer
from pretrain.objectives.base import Objective

NAME = "dino"


@dataclass
class Config:
    name: str = NAME
    crops: MultiCropSpec = field(default_factory=MultiCropSpec)
    # heads
    prototypes: int = 4096
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    separate_ibot_head: bool = False
    ibot_prototypes: int = 0  # 0: as many as the DINO head (only used with a separate head)
    # losses
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    teacher_temp_warmup_fraction: float = 0.3  # of train.steps
    centering: Literal["sinkhorn_knopp", "softmax"] = "sinkhorn_knopp"
    sinkhorn_iterations: int = 3
    center_momentum: float = 0.9
    # iBOT masks on the student's global crops
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = 0.5
    # teacher
    momentum_start: float = 0.992
    momentum_end: float = 1.0
    freeze_last_layer_steps: int = 0  # DINOv2 freezes the prototypes for its first epoch
    init_from: str = ""  # continued pretraining: our run/checkpoint/export, or a timm-format state dict
    eval_pool: str = "cls"

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum_start <= self.momentum_end <= 1.0:
            raise ValueError(f"objective.momentum_start <= momentum_end must lie in [0, 1], "
                             f"got {self.momentum_start}, {self.momentum_end}")
        if self.crops.n_global < 2 and self.crops.n_local < 1:
            raise ValueError("objective.crops: DINO needs two views at least (n_global >= 2, or n_local >= 1)")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if getattr(self, name) <= 0:
                raise ValueError(f"objective.{name} must be positive, got {getattr(self, name)}")


def cosine_momentum(step: int, total: int, start: float, end: float) -> float:
    """EMA momentum: ``start`` at step 0 rising along a half cosine to ``end`` at the last step."""
    progress = min(step / max(total - 1, 1), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1.0) / 2.0


def teacher_temperature(step: int, total: int, cfg: Config) -> float:
    """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp`` over the warm-up fraction, then constant."""
    warmup = int(cfg.teacher_temp_warmup_fraction * total)
    if warmup <= 0 or step >= warmup:
        return cfg.teacher_temp
    return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * step / warmup


class _Tower(nn.Module):
    """Backbone and heads: the student, and (a copy) the teacher."""

    def __init__(self, backbone: VisionTransformer, cfg: Config) -> None:
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


class DINO(Objective):
    def __init__(self, run_cfg) -> None:
        super().__init__()
        self.cfg: Config = run_cfg.objective
        self.model_cfg = run_cfg.model
        self.intensity = run_cfg.data.intensity
        crops = self.cfg.crops
        backbone = VisionTransformer(run_cfg.model)
        self.patch = backbone.patch_size
        for name, size in (("global_size", crops.global_size), ("local_size", crops.local_size)):
            if len(size) != len(self.patch) or any(s % p for s, p in zip(size, self.patch)):
                raise ValueError(f"objective.crops.{name} {list(size)} must have one size per spatial axis "
                                 f"({len(self.patch)}), each a multiple of the patch {list(self.patch)}")
        self.global_grid = backbone.grid_size(crops.global_size)
        self.prefix = backbone.num_prefix_tokens
        if self.cfg.init_from:
            from pretrain.models.pretrained import load_pretrained

            self.init_report = load_pretrained(backbone, self.cfg.init_from)
        self.student = _Tower(backbone, self.cfg)
        # The teacher starts as the student; it needs no stochastic depth (it never trains).
        self.teacher = copy.deepcopy(self.student)
        for block in self.teacher.backbone.blocks:
            block.drop_path = nn.Identity()
        self.teacher.requires_grad_(False)
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.ema = EMATeacher(self.student, self.teacher)
        if self.cfg.centering == "softmax":
            self.cls_center = RunningCenter(self.cfg.prototypes, self.cfg.center_momentum)
            self.patch_center = RunningCenter(self.student.patch_head().last_layer_v.shape[0], self.cfg.center_momentum)
        self.teacher_temp = teacher_temperature(0, 1, self.cfg)
        self.momentum = self.cfg.momentum_start

    # --- CPU side -------------------------------------------------------------------------
    def transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        rng = sample_rng(sample)
        views = multi_crop(sample["image"], self.cfg.crops, rng, self.model_cfg.in_chans, self.intensity,
                           key=sample["__key__"])
        masks = np.stack([sample_mask(self.global_grid, rng, tuple(self.cfg.mask_ratio), self.cfg.mask_probability)
                          for _ in views["global_crops"]])
        return {**views, "masks": torch.from_numpy(masks)}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_crops(samples)
        # Crop-major like the crops: all samples' mask of global crop 0, then of crop 1, ...
        batch["masks"] = torch.stack([s["masks"] for s in samples], dim=1).flatten(0, 1)
        return batch

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
        masks = batch["masks"].bool()
        batch_size = globals_.shape[0] // n_global
        softmax = self.cfg.centering == "softmax"

        with torch.no_grad():
            t_tokens = self.teacher.backbone.forward_features(globals_)
            t_cls_logits = self.teacher.dino_head(t_tokens[:, 0])
            t_patch_logits = self.teacher.patch_head()(t_tokens[:, self.prefix:][masks])
            t_cls = self._targets(t_cls_logits, self.cls_center if softmax else None)
            t_patch = self._targets(t_patch_logits, self.patch_center if softmax else None)

        s_tokens = self.student.backbone.forward_features(globals_, mask=masks, mask_token=self.mask_token)
        s_cls = s_tokens[:, 0]
        student_logits = list(self.student.dino_head(s_cls).chunk(n_global))
        if n_local:
            locals_ = batch["local_crops"].to(dtype)
            s_local_cls = self.student.backbone.forward_features(locals_)[:, 0]
            student_logits += list(self.student.dino_head(s_local_cls).chunk(n_local))
        s_patch_logits = self.student.patch_head()(s_tokens[:, self.prefix:][masks])

        loss_dino = dino_loss(student_logits, list(t_cls.chunk(n_global)), self.cfg.student_temp)
        sample_index = masks.nonzero()[:, 0]
        loss_ibot = ibot_loss(s_patch_logits, t_patch, sample_index, n_global * batch_size, self.cfg.student_temp)
        loss_koleo = sum(koleo_loss(c) for c in s_cls.chunk(n_global)) / n_global
        loss = self.cfg.dino_weight * loss_dino + self.cfg.ibot_weight * loss_ibot + self.cfg.koleo_weight * loss_koleo
        return {"loss": loss, "dino": loss_dino.detach(), "ibot": loss_ibot.detach(), "koleo": loss_koleo.detach(),
                "masked_fraction": masks.float().mean()}

    # --- hooks ----------------------------------------------------------------------------
    def set_progress(self, step: int, total_steps: int) -> None:
        self.teacher_temp = teacher_temperature(step, total_steps, self.cfg)
        self.momentum = cosine_momentum(step, total_steps, self.cfg.momentum_start, self.cfg.momentum_end)
        frozen = step < self.cfg.freeze_last_layer_steps
        for head in (self.student.dino_head, self.student.ibot_head):
            if head is not None:
                head.freeze_last_layer = frozen

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        self.ema.update(self.momentum)

    def log_scalars(self) -> dict[str, float]:
        return {"dino/teacher_temp": self.teacher_temp, "dino/momentum": self.momentum,
                "dino/last_layer_frozen": float(self.student.dino_head.freeze_last_layer)}

    def encoder(self) -> nn.Module:
        return self.teacher.backbone

    def eval_encoders(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher.backbone, "student": self.student.backbone}

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

    def tokens_per_sample(self) -> int:
        crops = self.cfg.crops
        local = math.prod(g // p for g, p in zip(crops.local_size, self.patch))
        return crops.n_global * (math.prod(self.global_grid) + self.prefix) + crops.n_local * (local + self.prefix)

    def flops_per_sample(self) -> float:
        """Student forward + backward on every crop (3x forward) plus the teacher's forward on the globals."""
        crops, vit = self.cfg.crops, self.student.backbone
        g = vit.flops_per_sample(crops.global_size)
        loc = vit.flops_per_sample(crops.local_size) if crops.n_local else 0.0
        return 3.0 * (crops.n_global * g + crops.n_local * loc) + crops.n_global * g


def build(run_cfg) -> DINO:
    return DINO(run_cfg)
