"""``flops_per_sample()`` of every objective against PyTorch's FLOP counter on the real forward + backward.

The formulas count matmuls (linear, conv, attention, heads, KoLeo's similarities)
analytically for the ViT and by FlopCounterMode on a meta twin for timm/MONAI
backbones; here the counter watches one real training step of a batch instead.
SDPA runs its math backend, whose matmuls the counter sees on CPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import load_config
from pretrain.objectives import build_objective

BATCH = 4


def _samples(n: int, shape: tuple[int, ...]) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 4096, size=shape).astype(np.uint16), "__key__": f"s{i}", "__seed__": i}
            for i in range(n)]


def _counted_per_sample(objective, shape: tuple[int, ...]) -> float:
    objective.set_schedules(0, {name: schedule(0, 100) for name, schedule in objective.schedules().items()})
    recipe = objective.data_recipe()
    samples = [dict(s, text="Multiple solid nodules in both lungs. No effusion.", meta={}) for s in _samples(BATCH, shape)]
    batch = recipe.collate([recipe.transform(s) for s in samples])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        objective(batch)["loss"].backward()
    return counter.get_total_flops() / BATCH


def _dino(*overrides: str):
    return load_config(None, [
        "objective.name=dino", "model.in_chans=1", f"data.batch_size={BATCH}", "objective.prototypes=64",
        "objective.head_hidden_dim=32", "objective.head_bottleneck_dim=16", "objective.crops.n_local=2",
        "objective.crops.global_size=[32,32]", "objective.crops.local_size=[16,16]", "objective.crops.flip_axes=[]",
        # an exact masked-patch count per global crop, so the expectation is the count
        "objective.mask_probability=1.0", "objective.mask_ratio=[0.25,0.25]", *overrides])


CASES = {
    "mae_2d": (lambda: load_config("configs/demo.yaml", ["model.preset=nano", f"data.batch_size={BATCH}",
                                                          "objective.decoder_depth=2", "objective.decoder_dim=32",
                                                          "objective.decoder_heads=2"]), (1, 64, 64)),
    "mae_3d": (lambda: load_config("configs/demo3d.yaml", ["model.preset=nano", f"data.batch_size={BATCH}"]),
               (1, 32, 32, 32)),
    "dino_vit": (lambda: _dino("model.preset=nano", "model.img_size=64", "model.patch_size=8"), (1, 64, 64)),
    "dino_vit_frozen_prototypes": (lambda: _dino("model.preset=nano", "model.img_size=64", "model.patch_size=8",
                                                 "objective.freeze_last_layer_steps=100000"), (1, 64, 64)),
    "dino_vit_registers_swiglu": (lambda: _dino("model.preset=nano", "model.img_size=64", "model.patch_size=8",
                                                "model.num_register_tokens=2", "model.mlp=swiglu"), (1, 64, 64)),
    "dino_timm_resnet18": (lambda: _dino("model.name=timm:resnet18", "model.img_size=64",
                                         "objective.ibot_weight=0"), (1, 64, 64)),
    "dino_monai_resnet10_3d": (lambda: _dino("model.name=monai:resnet10", "model.spatial_dims=3",
                                             "model.img_size=32", "model.kwargs={conv1_t_stride: 2}",
                                             "objective.ibot_weight=0", "objective.crops.global_size=[24,24,24]",
                                             "objective.crops.local_size=[16,16,16]"), (1, 32, 32, 32)),
    "lvm_med_vit": (lambda: _lvm("model.preset=nano", "model.img_size=32", "model.patch_size=8"), (1, 48, 48)),
    "lvm_med_vit_linear_mlp_projector": (lambda: _lvm("model.preset=nano", "model.img_size=32", "model.patch_size=8",
                                                      "objective.second_order=false",
                                                      "objective.projector_layers=2"), (1, 48, 48)),
    "lvm_med_timm_resnet18": (lambda: _lvm("model.name=timm:resnet18", "model.img_size=64",
                                           "objective.views.global_size=[64,64]"), (1, 64, 64)),
}


def _lvm(*overrides: str):
    return load_config(None, ["objective.name=lvm_med", "model.in_chans=1", f"data.batch_size={BATCH}",
                              f"objective.group_size={BATCH}", "objective.knn=2", "objective.views.global_size=[32,32]",
                              *overrides])


def _clip(text_model, *overrides: str):
    return load_config(None, ["objective.name=clip", f"objective.text_model={text_model}", "model.in_chans=1",
                              f"data.batch_size={BATCH}", "objective.embed_dim=32", "objective.max_tokens=16",
                              "model.preset=nano", "model.img_size=32", "model.patch_size=8", *overrides])


CLIP_CASES = {
    "clip_vit_infonce_flip": ((1, 32, 32), "objective.mask_ratio=0.5"),
    "clip_vit_siglip_locked_image": ((1, 32, 32), "objective.loss=siglip", "objective.lock_image=true"),
    "clip_frozen_text_mlp": ((1, 32, 32), "objective.freeze_text=true", "objective.projection=mlp"),
    "clip_vit_3d_mean": ((1, 32, 32, 32), "model.spatial_dims=3", "objective.image_pool=cls+mean"),
    "clip_monai_resnet10": ((1, 32, 32, 32), "model.name=monai:resnet10", "model.spatial_dims=3"),
}


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> str:
    from pretrain.tools.demo.text_tower import build_text_tower

    corpus = ["Multiple solid nodules in both lungs.", "No effusion.", "Thin-walled cysts."] * 5
    return str(build_text_tower(tmp_path_factory.mktemp("text") / "tower", corpus))


@pytest.mark.parametrize("case", list(CASES) + list(CLIP_CASES))
def test_flops_per_sample_equals_the_flop_counter(case, request):
    if case in CLIP_CASES:
        shape, *overrides = CLIP_CASES[case]
        make_cfg = lambda: _clip(request.getfixturevalue("text_model"), *overrides)  # noqa: E731
    else:
        make_cfg, shape = CASES[case]
    torch.manual_seed(0)
    objective = build_objective(make_cfg())
    counted = _counted_per_sample(objective, shape)
    assert objective.flops_per_sample() == pytest.approx(counted, rel=1e-6)
