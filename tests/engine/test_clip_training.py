"""CLIP through the real trainer: two ranks equal one rank with the accumulation cache, SIGKILL resumes exactly,
and the shipped 2D and 3D configs train, evaluate zero-shot and retrieval, and export.

The global contrastive batch of 2 ranks x 1 DataLoader worker x 1 micro-batch is, sample for sample, the batch
of 1 rank x 2 workers x 2 accumulated micro-batches (stream slot s serves rank s in the first, micro-batch s in
the second), so the gathered loss and the feature cache must give the same curve.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pretrain.data.manifest import read_manifest

from tests.engine.conftest import config_file, loss_curve, run_ranks, tiny_config, train_args
from tests.engine.test_resume import _kill_and_resume

pytestmark = pytest.mark.slow  # every test here starts training processes

STEPS = 8
# Observed: 8.6e-8 (InfoNCE) and 4.7e-7 (SigLIP) largest relative difference over 8 steps (the gradient
# average over 2 ranks and the sum over 2 micro-batches round differently).
RANKS_VS_ACCUM_RTOL = 1e-5


@pytest.fixture(scope="module")
def text_tower(tmp_path_factory) -> Path:
    from pretrain.tools.demo.text_tower import build_text_tower, demo_corpus

    return build_text_tower(tmp_path_factory.mktemp("clip_text") / "tower", demo_corpus(0, per_class=50))


@pytest.fixture(scope="module")
def clip_yaml(tmp_path_factory, demo_shards: Path, text_tower: Path) -> Path:
    cfg = tiny_config(demo_shards)
    cfg["objective"] = {"name": "clip", "text_model": str(text_tower), "embed_dim": 32, "max_tokens": 64,
                        "image_pool": "cls+mean", "text_dropout": 0.0}
    cfg["model"]["drop_path_rate"] = 0.0
    return config_file(tmp_path_factory, "clip_tiny", cfg)


def test_two_ranks_give_the_curve_of_one_rank_with_the_accumulation_cache(clip_yaml, tmp_path):
    # SigLIP: its chunked gather and its scalar gradients are the more delicate of the two losses
    # (both are checked in two processes against one in tests/losses/test_contrastive_losses.py)
    common = [f"train.steps={STEPS}", "objective.loss=siglip"]
    ranks, accum = tmp_path / "ranks", tmp_path / "accum"
    run_ranks(train_args(clip_yaml, ranks, *common, "train.zero_stage=2", "data.num_workers=1"), 2, tmp_path).assert_clean()
    run_ranks(train_args(clip_yaml, accum, *common, "train.grad_accum=2", "data.num_workers=2"), 1, tmp_path).assert_clean()
    two, one = loss_curve(ranks, STEPS), loss_curve(accum, STEPS)
    assert two == pytest.approx(one, rel=RANKS_VS_ACCUM_RTOL), (two, one)
    assert sum(two[-3:]) < sum(two[:3])  # and it learns


def test_sigkilled_clip_run_resumes_exactly(clip_yaml, tmp_path):
    _kill_and_resume(clip_yaml, tmp_path, 1, "train.grad_accum=2")


@pytest.fixture(scope="module")
def demo3d_shards(tmp_path_factory) -> Path:
    from pretrain.tools.demo.data import make_demo_data

    out = tmp_path_factory.mktemp("demo3d")
    make_demo_data(out, scale=0.04, splits=["pretrain_3d", "knn_train_3d", "knn_val_3d"], progress=False)
    return out


@pytest.mark.parametrize("config, dims", [("configs/clip/demo.yaml", 2), ("configs/clip/demo3d.yaml", 3)])
def test_shipped_clip_config_trains_evaluates_and_exports(config, dims, request, text_tower, tmp_path, capsys):
    from pretrain.tools.cli.main import main

    shards = request.getfixturevalue("demo_shards" if dims == 2 else "demo3d_shards")
    prompts = tmp_path / "prompts.json"
    from pretrain.tools.demo.reports import class_prompts

    prompts.write_text(json.dumps(class_prompts(dims)))
    run = tmp_path / "run"
    overrides = [f"objective.text_model={text_tower}", f"objective.class_prompts={prompts}",
                 f"data.train={shards / f'pretrain_{dims}d'}", f"eval.knn_train={shards / f'knn_train_{dims}d'}",
                 f"eval.knn_val={shards / f'knn_val_{dims}d'}", "train.steps=3", "train.log_every=1",
                 "data.batch_size=8", "data.num_workers=0", "train.progress=false", "train.threads=1",
                 "eval.batch_size=32", "model.preset=nano"]
    assert main(["train", config, f"train.run_dir={run}", *overrides]) == 0
    summary = json.loads((run / "summary.json").read_text())
    ev = summary["eval"]
    val_count = read_manifest(shards / f"knn_val_{dims}d")["num_samples"]
    for name in ("random_init", "pretrained"):
        assert 0.0 <= ev[name]["zeroshot"] <= 1.0 and 0.0 <= ev[name]["i2t_r5"] <= 1.0, ev[name]
        assert ev[name]["retrieval_pairs"] == val_count  # every held-out image with its report
    tags = set(EventAccumulator(str(run / "tb")).Reload().Tags()["scalars"])
    assert {"eval/image/zeroshot", "eval/image/i2t_r5", "eval/image/t2i_r1", "eval/random_init/zeroshot",
            "loss/logit_scale"} <= tags, tags
    capsys.readouterr()
    # the standalone commands read the trained run back and give the numbers summary.json holds
    val = str(shards / f"knn_val_{dims}d")
    assert main(["eval", "zeroshot", str(run), "--val", val]) == 0
    assert json.loads(capsys.readouterr().out)["zeroshot"] == ev["pretrained"]["zeroshot"]
    assert main(["eval", "retrieval", str(run), "--val", val]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["i2t_r5"] == ev["pretrained"]["i2t_r5"] and got["t2i_r10"] == ev["pretrained"]["t2i_r10"]
    from pretrain.tools.export.layout import export_meta

    meta = export_meta(run / "export")  # 2D: the whole model for open_clip; 3D: the image tower for MONAI
    assert meta["objective"] == "clip" and meta["encoder"] == "image"
    assert meta["target"] == {2: "open_clip", 3: "monai"}[dims]
