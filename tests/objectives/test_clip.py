"""CLIP: the recipe's texts and pair ids, the feature cache over micro-batches, the temperature clamp, towers
that are locked or frozen, and zero-shot prompts. A tiny BERT and tokenizer are built locally (offline)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.objectives import build_objective
from pretrain.objectives.clip import pair_id
from pretrain.tools.demo.reports import class_prompts
from pretrain.tools.demo.text_tower import build_text_tower

CORPUS = ["Multiple solid nodules in both lungs.", "No pleural effusion.", "Thin-walled cysts in the left lung.",
          "Short linear bands in the right lung.", "Reticular pattern with crossing lines.", "Heart size is normal."]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> str:
    return str(build_text_tower(tmp_path_factory.mktemp("text") / "tower", CORPUS * 4 + sum(class_prompts(2).values(), [])))


def clip(text_model: str, *overrides: str):
    cfg = load_config(None, ["objective.name=clip", f"objective.text_model={text_model}", "model.preset=nano",
                             "model.img_size=32", "model.patch_size=8", "model.in_chans=1", "objective.embed_dim=32",
                             "objective.max_tokens=24", "data.batch_size=4", *overrides])
    torch.manual_seed(0)
    return build_objective(cfg)


def _samples(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 4096, size=(1, 32, 32)).astype(np.uint16), "__key__": f"s{seed}_{i}",
             "__seed__": seed * 100 + i, "text": f"{CORPUS[i % 6]} {CORPUS[(i + 2) % 6]}", "meta": {}, "label": None}
            for i in range(n)]


def _batch(objective, n: int, seed: int = 0) -> dict:
    recipe = objective.data_recipe()
    return recipe.collate([recipe.transform(s) for s in _samples(n, seed)])


class PlainStepper:
    """The engine's contract without DeepSpeed: backward of loss / accumulation steps, as DeepSpeed scales it."""

    def __init__(self, model, accum: int) -> None:
        self.model, self.accum = model, accum

    def forward(self, batch, **kwargs):
        return self.model(batch, **kwargs)

    def backward(self, loss, out) -> bool:
        (loss / self.accum).backward()
        return True


def test_recipe_samples_sentences_prompts_and_pair_ids(text_model):
    objective = clip(text_model, "objective.sentences=2", "objective.prompt_templates=['chest x-ray with {}']")
    recipe = pickle.loads(pickle.dumps(objective.data_recipe()))
    assert len(pickle.dumps(recipe)) < 16_384  # no tokenizer or weights travel to the workers
    rng = np.random.default_rng(0)
    sample = {"__key__": "k1", "text": "One. Two. Three. Four.", "meta": {}}
    text, pid = recipe.caption(sample, rng)
    picked = text.split(" ")
    assert len(picked) == 2 and picked == sorted(picked, key=["One.", "Two.", "Three.", "Four."].index)
    assert pid == pair_id("key:k1")
    text, pid = recipe.caption({"__key__": "k2", "text": None, "meta": {"label_name": "cystic"}, "label": 1}, rng)
    assert text == "chest x-ray with cystic" and pid == pair_id("class:cystic")
    with pytest.raises(ValueError, match="'k3' has neither a report"):
        recipe.caption({"__key__": "k3", "text": "  ", "meta": {}, "label": None}, rng)
    study = clip(text_model, "objective.pair_by=study").data_recipe()
    a = study.caption({"__key__": "a", "text": "x.", "meta": {"study": "s1"}}, rng)[1]
    b = study.caption({"__key__": "b", "text": "y.", "meta": {"study": "s1"}}, rng)[1]
    assert a == b != study.caption({"__key__": "c", "text": "z.", "meta": {"study": "s2"}}, rng)[1]
    out = recipe.transform(dict(_samples(1)[0]))
    assert out["input_ids"].shape == (24,) and out["attention_mask"].sum() > 3 and out["pair_id"].dtype == torch.int64


def _grads(objective) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["infonce", "siglip"])
def test_feature_cache_over_micro_batches_gives_the_gradient_of_one_big_batch(text_model, loss):
    objective = clip(text_model, f"objective.loss={loss}", "train.grad_accum=2").eval()  # eval: no dropout
    micro = [_batch(objective, 4, seed=1), _batch(objective, 4, seed=2)]
    outs = objective.train_step(micro, PlainStepper(objective, accum=2))
    cached = _grads(objective)
    objective.zero_grad(set_to_none=True)
    big = {k: torch.cat([m[k] for m in micro]) for k in micro[0]}
    expected_loss = objective(big)["loss"]
    expected_loss.backward()
    expected = _grads(objective)
    assert cached.keys() == expected.keys() and len(cached) > 20
    torch.testing.assert_close(outs[0]["loss"], expected_loss, rtol=1e-5, atol=1e-6)
    for name in expected:
        torch.testing.assert_close(cached[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    # without the cache, each micro-batch is its own smaller contrastive problem: another gradient
    objective.zero_grad(set_to_none=True)
    objective.cfg.accum_cache = False
    objective.train_step(micro, PlainStepper(objective, accum=2))
    assert not torch.allclose(_grads(objective)["logit_scale"], expected["logit_scale"])


def test_second_pass_replays_the_first_pass_dropout(text_model):
    objective = clip(text_model, "train.grad_accum=3", "model.drop_path_rate=0.2").train()
    micro = [_batch(objective, 4, seed=s) for s in (1, 2, 3)]
    losses = [float(o["loss"].detach()) for o in objective.train_step(micro, PlainStepper(objective, accum=3))]
    # every pass computes the loss over the whole cache: equal only if each re-encoding matched its first pass
    assert losses[0] == losses[1] == losses[2]
    with torch.no_grad():
        a, b = objective(micro[0])["loss"], objective(micro[0])["loss"]
    assert a != b  # dropout and drop-path are active, so the replay above is what made them equal


def test_temperature_starts_at_one_over_t_and_is_clamped(text_model):
    objective = clip(text_model)
    assert abs(float(objective.scale().detach()) - 1 / 0.07) < 1e-4
    with torch.no_grad():
        objective.logit_scale.fill_(7.0)
    out = objective(_batch(objective, 4))
    assert float(out["logit_scale"]) == pytest.approx(100.0)
    out["loss"].backward()
    assert float(objective.logit_scale.grad) == 0.0  # above the clamp the optimizer cannot push it further
    siglip = clip(text_model, "objective.loss=siglip")
    assert float(siglip.scale().detach()) == pytest.approx(10.0) and float(siglip.logit_bias.detach()) == -10.0


def test_locked_image_and_frozen_text_layers_leave_the_optimizer(text_model):
    objective = clip(text_model, "objective.lock_image=true", "objective.freeze_text_layers=2",
                     "objective.text_lr_scale=0.1")
    trainable = {id(p) for g in objective.param_groups() for p in g["params"]}
    names = {id(p): n for n, p in objective.named_parameters()}
    assert not any(names[i].startswith("image.") for i in trainable)
    assert not any(names[i].startswith(("text.transformer.embeddings.", "text.transformer.encoder.layer.0."))
                   for i in trainable)
    assert any(names[i].startswith("text.transformer.encoder.layer.1.") for i in trainable)
    scales = {g["name"]: g["lr_scale"] for g in objective.param_groups()}
    assert scales["text/decay"] == 0.1 and scales["decay"] == 1.0
    out = objective(_batch(objective, 4))
    out["loss"].backward()
    assert objective.image.patch_embed.proj.weight.grad is None and objective.image_proj.weight.grad is not None


def test_flip_masking_needs_a_vit_and_keeps_the_asked_fraction(text_model):
    objective = clip(text_model, "objective.mask_ratio=0.75")
    assert objective.len_keep == 4 and "mask_noise" in _batch(objective, 2)
    with pytest.raises(ConfigError, match="FLIP"):
        clip(text_model, "objective.mask_ratio=0.5", "model.name=timm:resnet18")


def test_zero_shot_prompts_from_templates_or_a_file(text_model, tmp_path):
    objective = clip(text_model, "objective.prompt_templates=['a {} pattern','{}']")
    assert objective.class_prompts(["nodular"]) == {"nodular": ["a nodular pattern", "nodular"]}
    path = tmp_path / "prompts.json"
    path.write_text('{"nodular": ["solid nodules"]}')
    objective = clip(text_model, f"objective.class_prompts={path}")
    assert objective.class_prompts(["nodular"]) == {"nodular": ["solid nodules"]}
    with pytest.raises(ValueError, match=r"no prompts for classes \['cystic'\]"):
        objective.class_prompts(["nodular", "cystic"])
    embedded = objective.eval_bundle().embed_text(["solid nodules", "thin-walled cysts"])
    assert embedded.shape == (2, 32) and torch.allclose(embedded.norm(dim=1), torch.ones(2))
