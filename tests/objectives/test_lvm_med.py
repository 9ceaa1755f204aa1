"""LVM-Med as an objective: config checks, views that know where they came from, gradients into the encoder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.config import load_config
from pretrain.config.typed import ConfigError
from pretrain.losses.graph_affinity import cell_centres
from pretrain.objectives import build_objective
from pretrain.objectives.lvm_med import Config, LVMMedRecipe, TwoViewSpec, local_pairs_for


def _cfg(*overrides: str):
    return load_config(None, ["objective.name=lvm_med", "model.preset=nano", "model.in_chans=1", "model.img_size=32",
                              "model.patch_size=8", "data.batch_size=16", "objective.group_size=8",
                              "objective.views.global_size=[32,32]", *overrides])


def _batch(objective, n: int = 16, shape: tuple[int, ...] = (1, 48, 48), seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    recipe = objective.data_recipe()
    samples = [{"image": rng.integers(0, 4096, size=shape).astype(np.uint16), "__key__": f"s{i}",
                "__seed__": i} for i in range(n)]
    return recipe.collate([recipe.transform(s) for s in samples])


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=12", "not a multiple of 8"),
    ("objective.views.n_local=2", "n_global=2 and n_local=0"),
    ("objective.views.rotation_degrees=10", "rotations would misplace"),
    ("objective.knn=8", "objective.knn"),
    ("objective.blackbox_lambda=0", "objective.blackbox_lambda"),
    ("objective.views.global_size=[36,36]", "multiple of the patch"),
])
def test_bad_settings_are_refused_with_the_key(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        build_objective(_cfg(override))


def test_gamma_scales_with_the_cells_from_the_papers_7x7_value():
    assert local_pairs_for(49) == 20 and local_pairs_for(196) == 80 and local_pairs_for(64) == 26
    assert local_pairs_for(16, configured=40) == 16  # never more than the cells


def test_views_carry_the_box_and_flips_that_place_their_cells():
    """Images whose value is the row (then the column) in pixels: each 8 x 8 cell of a view (no intensity
    changes) averages to the row (column) of the cell centre that the recorded box and flips give, within
    a pixel (resampling blurs the borders a little); a flip misplaces cells by many pixels."""
    views = TwoViewSpec(global_size=(32, 32), global_scale=(0.3, 0.9), flip_axes=[-1, -2], blur_p=(0, 0, 0),
                        noise_p=0, intensity_p=0, gamma_p=0)
    recipe = LVMMedRecipe(Config(views=views, group_size=2, knn=1), in_chans=1, intensity="none")
    ramps = np.meshgrid(np.arange(64.0) + 0.5, np.arange(64.0) + 0.5, indexing="ij")
    flipped_any = False
    for seed in range(12):
        for axis, ramp in enumerate(ramps):
            item = recipe.transform({"image": ramp[None].astype(np.float32), "__key__": "ramp", "__seed__": seed})
            for v, name in enumerate(("view_s", "view_t")):
                cells = item[name][0].reshape(4, 8, 4, 8).mean(dim=(1, 3)).reshape(16)
                centre = cell_centres(item["boxes"][v:v + 1], item["flips"][v:v + 1], (4, 4))[0, :, axis] * 64
                assert (cells - centre).abs().max() < 1.0, (seed, axis, v, cells, centre)
                flipped_any |= bool(item["flips"][v, axis])
    assert flipped_any


BACKBONES = {
    "vit": [],
    "timm:resnet18": ["model.name=timm:resnet18", "model.img_size=64", "objective.views.global_size=[64,64]"],
    "vit_3d": ["model.spatial_dims=3", "objective.views.global_size=[16,16,16]", "model.img_size=16"],
}


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_gradients_reach_the_encoders_first_layer(backbone: str):
    torch.manual_seed(0)
    objective = build_objective(_cfg(*BACKBONES[backbone]))
    shape = (1, 20, 20, 20) if backbone == "vit_3d" else (1, 80, 80)
    out = objective(_batch(objective, shape=shape))
    assert 0.0 <= out["loss"].item() <= 1.0
    assert out["match_accuracy"].item() == pytest.approx(1.0 - out["loss"].item())
    out["loss"].backward()
    vit = backbone.startswith("vit")
    first = objective.backbone.patch_embed.proj.weight if vit else objective.backbone.net.conv1.weight
    assert first.grad is not None and first.grad.abs().sum() > 0
    for part in (objective.projector, objective.gcn):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_evaluation_forward_has_no_noise_and_the_linear_ablation_needs_no_edge_noise():
    torch.manual_seed(0)
    objective = build_objective(_cfg()).eval()
    batch = _batch(objective)
    assert torch.equal(objective(batch)["loss"], objective({**batch, "gumbel_vertex": batch["gumbel_vertex"] * 0,
                                                             "gumbel_edge": batch["gumbel_edge"] * 0})["loss"])
    linear = build_objective(_cfg("objective.second_order=false", "objective.gumbel_scale=0.5"))
    batch = _batch(linear)
    assert "gumbel_edge" not in batch and batch["gumbel_vertex"].shape == (16, 8)
    assert torch.isfinite(linear(batch)["loss"])


def test_the_noise_comes_from_each_samples_seed():
    objective = build_objective(_cfg())
    a, b = _batch(objective, seed=0), _batch(objective, seed=1)  # different pixels, same seeds
    assert torch.equal(a["gumbel_edge"], b["gumbel_edge"]) and torch.equal(a["boxes"], b["boxes"])
    assert not torch.equal(a["gumbel_edge"][0], a["gumbel_edge"][1])


def test_the_edge_weight_warms_up_from_first_order_matching():
    objective = build_objective(_cfg("objective.edge_warmup_fraction=0.5", "train.steps=100",
                                     "objective.gumbel_scale=0"))
    schedule = objective.schedules()["edge_weight"]
    assert [schedule(s, 100) for s in (0, 25, 50, 99)] == [0.0, 0.5, 1.0, 1.0]
    batch = _batch(objective)
    objective.set_schedules(0, {"edge_weight": 0.0})
    first_order = objective(batch)
    linear = build_objective(_cfg("objective.second_order=false", "objective.gumbel_scale=0"))
    linear.load_state_dict(objective.state_dict())
    assert torch.equal(first_order["loss"], linear(batch)["loss"])
    assert linear.schedules() == {}
