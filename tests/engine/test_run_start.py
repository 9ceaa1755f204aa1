"""What a run says when it starts: its thread plan, images it would upsample, no alarming loss=nan."""
from __future__ import annotations

from pathlib import Path

from pretrain.config import load_config
from pretrain.engine.preflight import upsampling_warnings
from pretrain.objectives import build_objective
from pretrain.tools.cli.main import main

REPO = Path(__file__).resolve().parents[2]


def test_a_run_prints_its_thread_plan_warns_of_upsampling_and_shows_no_nan_loss(tiny_yaml: Path, tmp_path: Path,
                                                                                  capfd):
    code = main(["train", str(tiny_yaml), f"train.run_dir={tmp_path / 'run'}", "model.img_size=128", "train.steps=3",
                 "train.log_every=2", "train.progress=true", "--no-export"])
    err = capfd.readouterr().err
    assert code == 0, err[-3000:]
    assert "[medpretrain] threads: 1 per rank (train.threads)" in err
    assert "images are at most 64x64, smaller than the 128x128 views" in err and "upsampled (2.0x" in err
    assert "nan" not in err.lower()  # the bar shows no loss before the first logged step


def test_upsampling_is_named_only_when_every_image_is_smaller_than_the_view(tiny_yaml: Path):
    cfg = load_config(tiny_yaml, [])
    assert upsampling_warnings(cfg, (64, 64)) == [] and upsampling_warnings(cfg, (32, 32)) == []
    assert len(upsampling_warnings(cfg, (96, 96))) == 1
    assert upsampling_warnings(cfg, (64, 64, 64)) == []  # a 3D view of 2D shards: no 3D images to compare


def test_dino_compares_its_global_crops_with_the_images(tiny_yaml: Path):
    cfg = load_config(REPO / "configs" / "dino" / "demo.yaml", [f"data.train={load_config(tiny_yaml).data.train[0].shards}",
                                                                "objective.crops.global_size=[80,80]"])
    recipe = build_objective(cfg).data_recipe()
    assert recipe.whole_view_size() == (80, 80)
    (warning,) = upsampling_warnings(cfg, recipe.whole_view_size())
    assert "80x80 views" in warning and "crop sizes" in warning
