"""DINO objective in one process: schedules, views and masks, the fp32 EMA teacher, robustness."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pretrain.config import load_config
from pretrain.models.ema import EMATeacher, merge_rank_states
from pretrain.objectives import build_objective
from pretrain.objectives.dino import momentum_schedule, teacher_temp_schedule


def _config(spatial_dims: int = 2, **objective):
    size = [32, 32] if spatial_dims == 2 else [16, 16, 16]
    local = [16, 16] if spatial_dims == 2 else [8, 8, 8]
    crops = {"global_size": [24] * spatial_dims, "local_size": local, "n_global": 2, "n_local": 3,
             "flip_axes": [], "blur_p": [0.0, 0.0, 0.0], "noise_p": 0.0}
    crops.update(objective.pop("crops", {}))
    return load_config(None, [
        "model.preset=nano", f"model.spatial_dims={spatial_dims}", f"model.img_size={size}", "model.patch_size=8"
        if spatial_dims == 2 else "model.patch_size=4", "model.in_chans=1", "objective.name=dino",
        f"objective.crops={crops}", "objective.prototypes=64", "objective.head_hidden_dim=32",
        "objective.head_bottleneck_dim=16", *[f"objective.{k}={v}" for k, v in objective.items()],
    ])


def _samples(n: int, shape=(1, 40, 40), seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 4096, size=shape).astype(np.uint16), "__key__": f"s{i}", "__seed__": 100 + i}
            for i in range(n)]


def test_schedules():
    cfg = _config(teacher_temp=0.07, warmup_teacher_temp=0.04, teacher_temp_warmup_fraction=0.5,
                  momentum_start=0.99, momentum_end=1.0).objective
    momentum, temp = momentum_schedule(cfg), teacher_temp_schedule(cfg)
    assert momentum(0, 100) == pytest.approx(0.99)
    assert momentum(50, 100) == pytest.approx(0.995)
    assert momentum(100, 100) == pytest.approx(1.0)
    assert momentum(25, 100) < momentum(50, 100) < momentum(75, 100)
    assert temp(0, 100) == pytest.approx(0.04)
    assert temp(25, 100) == pytest.approx(0.055)
    assert temp(50, 100) == temp(99, 100) == pytest.approx(0.07)


@pytest.mark.parametrize("dims, image, grid", [(2, (1, 40, 40), 9), (3, (1, 20, 20, 20), 216)])
def test_views_masks_and_losses_2d_3d(dims, image, grid):
    torch.manual_seed(0)
    obj = build_objective(_config(dims, mask_probability=1.0, mask_ratio=[0.2, 0.4]))
    batch = obj.data_recipe().collate([obj.data_recipe().transform(s) for s in _samples(4, image)])
    g = [24] * dims
    assert tuple(batch["global_crops"].shape) == (8, 1, *g)
    assert tuple(batch["local_crops"].shape) == (12, 1, *([16, 16] if dims == 2 else [8, 8, 8]))
    assert tuple(batch["masks"].shape) == (8, grid)
    ratios = batch["masks"].float().mean(dim=1)
    assert ((ratios >= 0.2 - 1 / grid) & (ratios <= 0.4 + 1 / grid)).all(), ratios
    # Crop-major masks: row c * B + b belongs to sample b's crop c, as the crops do.
    one = obj.data_recipe().transform(_samples(4, image)[1])
    assert torch.equal(batch["masks"][4 + 1], one["masks"][1])
    assert torch.equal(batch["global_crops"][4 + 1], one["global_crops"][1])
    out = obj(batch)
    assert set(out) >= {"loss", "dino", "ibot", "koleo"}
    assert all(torch.isfinite(v).all() for v in out.values())
    out["loss"].backward()
    assert obj.mask_token.grad is not None and obj.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in obj.teacher.parameters())
    # The loss is the configured mix of its parts.
    expected = out["dino"] + out["ibot"] + 0.1 * out["koleo"]
    assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-5)


def test_same_seed_same_views_resume_safe():
    obj = build_objective(_config())
    a, b = obj.data_recipe().transform(_samples(1)[0]), obj.data_recipe().transform(_samples(1)[0])
    assert all(torch.equal(x, y) for x, y in zip(a["local_crops"], b["local_crops"]))
    assert torch.equal(a["masks"], b["masks"])


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "softmax"])
def test_batch_of_one_in_bf16_stays_finite(centering):
    torch.manual_seed(0)
    obj = build_objective(_config(centering=centering, mask_probability=1.0)).to(torch.bfloat16)
    batch = obj.data_recipe().collate([obj.data_recipe().transform(s) for s in _samples(1)])
    for _ in range(2):
        out = obj(batch)
        assert all(torch.isfinite(v.float()).all() for v in out.values()), out
        out["loss"].backward()
    grads = [p.grad for p in obj.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g.float()).all() for g in grads)


def test_ema_matches_the_closed_form_and_accumulates_in_fp32():
    """teacher_k = prod m_i * teacher_0 + sum_i (1 - m_i) prod_{j>i} m_j * student_i, with bf16 parameters."""
    torch.manual_seed(0)
    student, teacher = nn.Linear(6, 5).to(torch.bfloat16), nn.Linear(6, 5).to(torch.bfloat16)
    ema = EMATeacher(student, teacher)
    expected = {n: p.detach().double() for n, p in teacher.named_parameters()}
    momenta = [0.999, 0.9995, 0.9999] * 200
    for m in momenta:
        with torch.no_grad():
            for p in student.parameters():
                p.copy_(torch.randn_like(p, dtype=torch.float32) + 3.0)
        for n, p in student.named_parameters():
            expected[n] = m * expected[n] + (1 - m) * p.detach().double()
        ema.update(m)
    master = dict(zip(ema.names, ema.state_dict()["master"]))
    for n, p in teacher.named_parameters():
        assert torch.allclose(master[n].double(), expected[n], atol=1e-4), n
        assert torch.equal(p.detach(), master[n].to(torch.bfloat16))
        # A bf16 accumulator would have stalled near its start: the mean moved by ~3 * (1 - prod m).
        assert (expected[n] - p.detach().double()).abs().max() < 0.02
    drift = 3.0 * (1 - math.prod(momenta))
    assert drift > 0.5


def test_ema_state_round_trips_and_merges_zero3_like_shards():
    student, teacher = nn.Linear(3, 4), nn.Linear(3, 4)
    ema = EMATeacher(student, teacher)
    ema.update(0.5)
    state = ema.state_dict()
    fresh_teacher = nn.Linear(3, 4)
    fresh = EMATeacher(nn.Linear(3, 4), fresh_teacher)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), fresh_teacher.parameters()))
    merged = merge_rank_states([state, state])
    assert torch.equal(merged["weight"], teacher.weight.detach())
    # Two ranks each holding half of the flattened weight (padded), as ZeRO-3 would.
    flat = teacher.weight.detach().reshape(-1)
    halves = [flat[:6], torch.cat([flat[6:], torch.zeros(0)])]
    shard_states = [{"layout": [("weight", "shard", [4, 3])], "master": [h]} for h in halves]
    assert torch.equal(merge_rank_states(shard_states)["weight"], teacher.weight.detach())


def test_frozen_prototypes_get_no_gradient_during_the_first_steps():
    obj = build_objective(_config(freeze_last_layer_steps=3))
    batch = obj.data_recipe().collate([obj.data_recipe().transform(s) for s in _samples(2)])
    obj.set_schedules(2, {"teacher_temp": 0.04, "momentum": 0.99})
    obj(batch)["loss"].backward()
    assert obj.student.dino_head.last_layer_v.grad is None
    obj.zero_grad()
    obj.set_schedules(3, {"teacher_temp": 0.04, "momentum": 0.99})
    obj(batch)["loss"].backward()
    assert obj.student.dino_head.last_layer_v.grad.abs().sum() > 0


def test_bad_crop_sizes_name_the_key():
    with pytest.raises(Exception, match="crops.global_size"):
        build_objective(_config(crops={"global_size": [20, 20]}))


def test_continued_pretraining_starts_student_and_teacher_from_the_given_weights(tmp_path):
    """A DINOv2-style checkpoint ({"teacher": {"backbone.*": ...}}) of an RGB model seeds a 1-channel run."""
    from pretrain.models.vit import VisionTransformer

    rgb = load_config(None, ["model.preset=nano", "model.img_size=[32, 32]", "model.patch_size=8", "model.in_chans=3",
                             "model.pos_embed=sincos"]).model
    torch.manual_seed(1)
    source = VisionTransformer(rgb)
    path = tmp_path / "dinov2_like.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in source.state_dict().items()}}, path)
    obj = build_objective(_config(init_from=str(path)))
    for tower in (obj.student, obj.teacher):
        got = tower.backbone.state_dict()
        assert torch.equal(got["blocks.0.attn.qkv.weight"], source.state_dict()["blocks.0.attn.qkv.weight"])
        assert torch.allclose(got["patch_embed.proj.weight"], source.patch_embed.proj.weight.sum(dim=1, keepdim=True))
    assert obj.init_report["loaded"] > 0



@pytest.mark.parametrize("separate", [False, True])
def test_ibot_uses_its_own_head_only_when_asked(separate):
    """With the DINO loss weighted 0, the DINO head learns only through iBOT: when the head is shared."""
    torch.manual_seed(0)
    obj = build_objective(_config(separate_ibot_head=separate, ibot_prototypes=32, mask_probability=1.0,
                                  dino_weight=0.0, koleo_weight=0.0))
    assert (obj.student.patch_head() is obj.student.ibot_head) == separate
    batch = obj.data_recipe().collate([obj.data_recipe().transform(s) for s in _samples(2)])
    obj(batch)["loss"].backward()
    dino_grad = obj.student.dino_head.last_layer_v.grad
    if separate:
        assert obj.student.ibot_head.last_layer_v.shape[0] == 32
        assert obj.student.ibot_head.last_layer_v.grad.abs().sum() > 0
        assert dino_grad is None or dino_grad.abs().sum() == 0
    else:
        assert dino_grad.abs().sum() > 0
