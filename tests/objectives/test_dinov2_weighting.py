"""The DINO objective's total loss weights its terms as DINOv2 does (the default), or as documented means.

DINOv2 (ssl_meta_arch): KoLeo is ``sum(koleo(c) for c in global_cls.chunk(2))``
and iBOT's ``forward_masked`` gives each masked patch the weight 1/n_b of its
image and divides the sum by the number of global-crop images. Here the terms
are recomputed from the student's own class tokens and patch logits, captured
during the objective's forward, with those formulas written out by hand.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.config import load_config
from pretrain.losses.ibot_loss import ibot_loss
from pretrain.losses.koleo_loss import koleo_loss
from pretrain.objectives import build_objective


def _objective(weighting: str):
    torch.manual_seed(0)
    cfg = load_config(None, [
        "objective.name=dino", "model.preset=nano", "model.img_size=32", "model.patch_size=8", "model.in_chans=1",
        "objective.prototypes=64", "objective.head_hidden_dim=32", "objective.head_bottleneck_dim=16",
        "objective.crops.global_size=[24,24]", "objective.crops.local_size=[16,16]", "objective.crops.n_local=2",
        "objective.mask_probability=0.5", "objective.koleo_weight=0.3", "objective.ibot_weight=0.7",
        f"objective.loss_weighting={weighting}"])
    return build_objective(cfg)


def _batch(objective, n: int = 6):
    rng = np.random.default_rng(1)
    recipe = objective.data_recipe()
    samples = [{"image": rng.integers(0, 4096, size=(1, 32, 32)).astype(np.uint16), "__key__": f"s{i}",
                "__seed__": 10 + i} for i in range(n)]
    return recipe.collate([recipe.transform(s) for s in samples])


def _forward_capturing(objective, batch):
    """The objective's outputs and what its student heads were fed (class tokens, masked patch logits)."""
    seen: dict[str, list[torch.Tensor]] = {"cls_in": [], "patch_out": []}
    hooks = [objective.student.dino_head.register_forward_hook(lambda m, i, o: seen["cls_in"].append(i[0])),
             objective.student.patch_head().register_forward_hook(lambda m, i, o: seen["patch_out"].append(o))]
    try:
        out = objective(batch)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def _dinov2_ibot(student_logits_MK, teacher_probs_MK, masks_NP, temp):
    """DINOv2's iBOTPatchLoss.forward_masked, literally."""
    loss = torch.sum(teacher_probs_MK * torch.log_softmax(student_logits_MK / temp, dim=-1), dim=-1)
    masks_weight = (1 / masks_NP.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks_NP)[masks_NP]
    return -(loss * masks_weight).sum() / masks_NP.shape[0]


@pytest.mark.parametrize("weighting", ["dinov2", "mean"])
def test_total_is_the_weighted_sum_of_terms_computed_another_way(weighting):
    objective = _objective(weighting)
    batch = _batch(objective)
    out, seen = _forward_capturing(objective, batch)
    cfg = objective.cfg
    n_global = cfg.crops.n_global
    # the first call of the DINO head takes the global crops' class tokens, crop-major
    global_cls = seen["cls_in"][0]
    koleo_per_crop = [koleo_loss(c) for c in global_cls.chunk(n_global)]
    koleo = sum(koleo_per_crop) if weighting == "dinov2" else sum(koleo_per_crop) / n_global
    torch.testing.assert_close(out["koleo"], koleo.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["loss"], cfg.dino_weight * out["dino"] + cfg.ibot_weight * out["ibot"]
                               + cfg.koleo_weight * out["koleo"], rtol=1e-6, atol=1e-6)


def test_ibot_default_is_dinov2s_forward_masked():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(8, 16, generator=g) < 0.3
    masks[2] = False  # an image with no masked patch still counts in DINOv2's denominator
    m = int(masks.sum())
    student = torch.randn(m, 32, generator=g) * 3
    teacher = torch.softmax(torch.randn(m, 32, generator=g), dim=-1)
    index = masks.nonzero()[:, 0]
    ours = ibot_loss(student, teacher, index, masks.shape[0], 0.1, divide_by="batch")
    torch.testing.assert_close(ours, _dinov2_ibot(student, teacher, masks, 0.1), rtol=1e-6, atol=1e-7)
    per_masked_image = ibot_loss(student, teacher, index, masks.shape[0], 0.1, divide_by="masked_images")
    images_with_masks = int(masks.any(dim=1).sum())
    torch.testing.assert_close(per_masked_image, ours * masks.shape[0] / images_with_masks)


def test_dinov2_weighting_is_the_default():
    assert load_config(None, ["objective.name=dino"]).objective.loss_weighting == "dinov2"
