"""The objective contract v2: recipes, parameter groups and their scales, schedules, the registry, train_step."""
from __future__ import annotations

import dataclasses
import json
import math
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from pretrain.config import ConfigError, load_config
from pretrain.config.registry import objective_entry, objectives, register_objective
from pretrain.objectives import build_objective
from pretrain.objectives.base import BuildContext, DataRecipe, EvalBundle, Objective
from pretrain.optim.param_groups import apply_scales, layer_decay_groups
from pretrain.optim.schedules import Schedule

CONFIGS = {"mae": ("configs/demo.yaml", []), "dino": ("configs/dino/demo.yaml", []),
           "dino_resnet": ("configs/dino/demo.yaml", ["model.name=timm:resnet18", "objective.ibot_weight=0"]),
           "lvm_med": ("configs/lvm_med/demo.yaml", ["objective.group_size=2", "objective.knn=1", "data.batch_size=2"])}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_data_recipe_pickles_small_and_without_weights(case):
    path, overrides = CONFIGS[case]
    objective = build_objective(load_config(path, overrides))
    blob = pickle.dumps(objective.data_recipe())
    weights = sum(p.numel() * p.element_size() for p in objective.parameters())
    assert len(blob) < 16_384 < weights, (len(blob), weights)
    recipe = pickle.loads(blob)
    assert not any(isinstance(v, (nn.Module, torch.Tensor)) for v in vars(recipe).values())
    rng = np.random.default_rng(0)
    sample = {"image": rng.integers(0, 4096, size=(1, 64, 64)).astype(np.uint16), "__key__": "k", "__seed__": 3}
    batch = recipe.collate([recipe.transform(dict(sample)), recipe.transform(dict(sample, __seed__=4))])
    with torch.no_grad():
        assert np.isfinite(float(objective(batch)["loss"]))


@pytest.mark.parametrize("case", list(CONFIGS))
def test_default_groups_cover_every_trainable_parameter_once_without_decay_on_norms_biases_tokens(case):
    path, overrides = CONFIGS[case]
    objective = build_objective(load_config(path, overrides))
    groups = objective.param_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in objective.parameters() if p.requires_grad}
    names = {id(p): n for n, p in objective.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["wd_scale"] == 0 for p in g["params"]}
    assert all(p.ndim <= 1 or "token" in n or n.endswith("pos_embed") for n, p in objective.named_parameters()
               if names[id(p)] in no_decay)
    assert any(n.endswith(".bias") for n in no_decay) and all(g["lr_scale"] == 1.0 for g in groups)


def test_scales_multiply_the_scheduled_values():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    groups = [{"params": list(a.parameters()), "lr_scale": 0.1, "wd_scale": 1.0},
              {"params": list(b.parameters()), "lr_scale": 1.0, "wd_scale": 0.0}]
    apply_scales(groups, lr=2e-3, weight_decay=0.05)
    assert [g["lr"] for g in groups] == pytest.approx([2e-4, 2e-3])
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]


def test_layer_decay_groups_scale_by_depth():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    groups = layer_decay_groups(model, lambda name: int(name.split(".")[0]), num_layers=2, decay=0.5)
    scales = {g["name"]: g["lr_scale"] for g in groups}
    assert scales == {"layer0/decay": 0.25, "layer0/no_decay": 0.25, "layer1/decay": 0.5, "layer1/no_decay": 0.5,
                      "layer2/decay": 1.0, "layer2/no_decay": 1.0}


def test_schedule_shapes_and_warmup():
    cos = Schedule(1.0, 0.0, "cosine", warmup_steps=10, warmup_from=0.5)
    assert [cos(s, 110) for s in (0, 5, 10)] == pytest.approx([0.5, 0.75, 1.0])
    assert cos(60, 110) == pytest.approx(0.5) and cos(110, 110) == pytest.approx(0.0)
    lin = Schedule(1.0, 0.2, "linear")
    assert [lin(s, 100) for s in (0, 50, 100)] == pytest.approx([1.0, 0.6, 0.2])
    const = Schedule(0.07, 0.5, "constant", warmup_fraction=0.3, warmup_from=0.04)
    assert const(15, 100) == pytest.approx(0.055) and const(30, 100) == const(99, 100) == pytest.approx(0.07)
    with pytest.raises(ValueError, match="shape"):
        Schedule(1.0, shape="step")


def test_the_registry_names_the_known_objectives_and_suggests_the_closest():
    assert {"mae", "dino"} <= set(objectives())
    with pytest.raises(ConfigError, match="unknown objective 'dinno'; did you mean 'dino'"):
        objective_entry("dinno")
    with pytest.raises(ConfigError, match="MAE hides patches by dropping ViT tokens"):
        build_objective(load_config("configs/demo.yaml", ["model.name=timm:resnet18"]))
    with pytest.raises(ConfigError, match="iBOT masks patch tokens"):
        build_objective(load_config("configs/dino/demo.yaml", ["model.name=timm:resnet18"]))


# --- a third objective, registered from outside the package, with its own train_step ------------
@dataclass
class CacheConfig:
    name: str = "test_feature_cache"  # registered by this test module
    width: int = 8  # projection width


class CacheRecipe(DataRecipe):
    def transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        x = torch.from_numpy(np.asarray(sample["image"], dtype=np.float32))[:, :16, :16]
        return {"image": (x - x.mean()) / (x.std() + 1e-6)}

    def collate(self, samples):
        return {"image": torch.stack([s["image"] for s in samples])}


class FeatureCache(Objective):
    """A toy of CLIP's accumulation cache: no-grad features of every micro-batch, then one backward each."""

    calls: list[int] = []

    def __init__(self, run_cfg, ctx: BuildContext) -> None:
        super().__init__(ctx)
        self.proj = nn.Linear(256, run_cfg.objective.width)

    def data_recipe(self) -> CacheRecipe:
        return CacheRecipe()

    def features(self, batch):
        return nn.functional.normalize(self.proj(batch["image"].flatten(1).to(self.compute_dtype)), dim=-1)

    def forward(self, batch, cache=None, index=0):
        z = self.features(batch)
        if cache is None:
            return {"loss": z.sum() * 0.0, "_z": z}
        everything = torch.cat([*cache[:index], z, *cache[index + 1:]])
        return {"loss": (everything @ everything.T).logsumexp(dim=1).mean()}

    def train_step(self, micro_batches, stepper):
        FeatureCache.calls.append(len(micro_batches))
        with torch.no_grad():
            cache = [stepper.forward(b)["_z"] for b in micro_batches]
        outputs = []
        for i, batch in enumerate(micro_batches):
            out = stepper.forward(batch, cache=cache, index=i)
            if stepper.backward(out["loss"], out):
                outputs.append(out)
        return outputs

    def eval_bundle(self) -> EvalBundle:
        raise NotImplementedError("not evaluated")

    def flops_per_sample(self) -> float:
        return 3.0 * 2 * 256 * self.proj.out_features


register_objective("test_feature_cache", CacheConfig, lambda run_cfg, ctx: FeatureCache(run_cfg, ctx))


@pytest.mark.slow
def test_an_objective_registered_elsewhere_trains_with_its_own_train_step(tmp_path):
    from pretrain.engine.trainer import train
    from pretrain.tools.demo.data import make_demo_data

    make_demo_data(tmp_path / "d", scale=0.01, splits=["pretrain_2d"], progress=False)
    cfg = load_config(None, [
        "objective.name=test_feature_cache", "model.preset=nano", "model.img_size=64", "model.patch_size=8", f"data.train={tmp_path / 'd' / 'pretrain_2d'}", "data.batch_size=4",
        "data.num_workers=0", "train.steps=3", "train.grad_accum=2", "train.log_every=1", "train.progress=false",
        f"train.run_dir={tmp_path / 'run'}", "eval.knn_train=null", "eval.knn_val=null", "train.export_on_end=false"])
    FeatureCache.calls.clear()
    summary = train(cfg)
    assert FeatureCache.calls == [2, 2, 2] and summary["steps"] == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss/total"]) for r in rows)
    assert rows[0]["loss/total"] != rows[-1]["loss/total"]  # the weights moved
    assert dataclasses.asdict(cfg.objective) == {"name": "test_feature_cache", "width": 8}
