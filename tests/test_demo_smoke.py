"""The demo path end to end, shortened: demo shards -> pretrain train -> eval -> export -> summary.json."""
from __future__ import annotations

import pytest

import json
import subprocess
import sys

import numpy as np

from pretrain.tools.demo.data import make_demo_data
from pretrain.tools.demo.phantoms import CLASSES_2D, LABEL_MAP, ct_volume, radiograph


def test_phantoms_are_native_dtype_with_label_maps_and_class_independent_in_intensity():
    rng = np.random.default_rng(0)
    xr, xr_map = radiograph(2, 64, rng)
    ct, ct_map = ct_volume(1, 16, rng)
    assert xr.shape == (1, 64, 64) and xr.dtype == np.uint16 and xr.max() <= 4095
    assert ct.shape == (1, 16, 16, 16) and ct.dtype == np.int16 and ct.min() >= -1024
    for labels in (xr_map, ct_map):
        assert labels.shape == (1, *labels.shape[1:]) and labels.dtype == np.uint8
        assert set(np.unique(labels)) == set(range(len(LABEL_MAP)))  # every structure is drawn, the finding too
    # Mean intensity carries (almost) no class information: per-class means overlap widely.
    means = {c: [radiograph(c, 32, rng)[0].mean() for _ in range(100)] for c in range(len(CLASSES_2D))}
    spread = max(np.mean(v) for v in means.values()) - min(np.mean(v) for v in means.values())
    assert spread < 0.5 * min(np.std(v) for v in means.values())


def _pixels(generator, size, count, seed, grid):
    rng = np.random.default_rng(seed)
    x = np.stack([generator(i % 4, size, rng)[0][0].astype(np.float32) for i in range(count)])
    x = (x - x.mean(axis=tuple(range(1, x.ndim)), keepdims=True)) / x.std(axis=tuple(range(1, x.ndim)), keepdims=True)
    f = size // grid
    x = x.reshape(count, *[v for _ in range(x.ndim - 1) for v in (grid, f)]).mean(axis=tuple(range(2, 2 * x.ndim, 2)))
    import torch
    return torch.from_numpy(x.reshape(count, -1)), torch.arange(count) % 4


@pytest.mark.parametrize("dims", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_raw_pixels_cannot_tell_the_demo_classes(dims):
    """The demo's classes are not in the pixels: kNN and a linear probe on raw pixels stay near chance (25%)."""
    from pretrain.eval.knn import knn_top1
    from pretrain.eval.linear import linear_probe

    generator, size, n = (radiograph, 64, 600) if dims == 2 else (ct_volume, 32, 240)
    for grid in ((8, 64) if dims == 2 else (4, 32)):  # the ViT's patch grid, and every pixel
        x, y = _pixels(generator, size, n, 1, grid)
        xv, yv = _pixels(generator, size, n // 2, 2, grid)
        assert knn_top1(x, y, xv, yv, k=20, temperature=0.07) < 0.40
        assert linear_probe({"pixels": x}, y, {"pixels": xv}, yv).accuracy < 0.40


@pytest.mark.slow
def test_demo_run_end_to_end(tmp_path, capsys):
    data = tmp_path / "demo_data"
    counts = make_demo_data(data, scale=0.02, splits=["pretrain_2d", "knn_train_2d", "knn_val_2d"], progress=False)
    assert counts == {"pretrain_2d": 160, "knn_train_2d": 20, "knn_val_2d": 10}
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "pretrain.tools.cli.main", "train", "configs/demo.yaml", f"train.run_dir={run}",
        f"data.train={data / 'pretrain_2d'}", f"eval.knn_train={data / 'knn_train_2d'}", f"eval.knn_val={data / 'knn_val_2d'}",
        "train.steps=4", "train.ckpt_every=2", "train.image_log_every=2", "data.batch_size=8", "data.num_workers=1",
        "model.preset=nano", "train.progress=false", "eval.batch_size=16",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and np.isfinite(summary["final_loss"])
    assert 0.0 <= summary["knn_init"] <= 1.0 and 0.0 <= summary["knn_final"] <= 1.0
    # Every result stands beside raw pixels and the random-init encoder, with the gain over the better one.
    ev = summary["eval"]
    assert {"raw_pixels", "random_init", "pretrained", "gain_over_baselines"} <= set(ev)
    assert {"knn", "linear"} <= set(ev["raw_pixels"]) and {"knn_cls", "knn_mean", "linear"} <= set(ev["pretrained"])
    assert ev["random_init"]["knn"] == summary["knn_init"] and ev["pretrained"]["knn"] == summary["knn_final"]
    assert ev["gain_over_baselines"]["linear"] == pytest.approx(
        ev["pretrained"]["linear"] - max(ev["raw_pixels"]["linear"], ev["random_init"]["linear"]))
    assert "raw pixels" in proc.stdout and "random init" in proc.stdout and "gain" in proc.stdout
    assert (run / "export" / "model.safetensors").is_file() and summary["export"] == str((run / "export").resolve())
    assert "held-out" in proc.stdout and str(run / "export") in proc.stdout
    # `pretrain eval knn` on the run pools as training did, so it reports summary.json's number
    from pretrain.tools.cli.main import main

    knn_args = ["--train", str(data / "knn_train_2d"), "--val", str(data / "knn_val_2d")]
    for source in (run, run / "export"):
        assert main(["eval", "knn", str(source), *knn_args]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["knn_top1"] == summary["knn_final"]
    # `pretrain eval probe` reports the run's numbers and the same raw-pixel baseline
    assert main(["eval", "probe", str(run / "export"), *knn_args]) == 0
    probe = json.loads(capsys.readouterr().out)
    for key in ("knn_cls", "knn_mean", "linear"):
        assert probe["pretrained"][key] == summary["eval"]["pretrained"][key]
    assert probe["raw_pixels"] == summary["eval"]["raw_pixels"]
    # summary.json records the compute a scaling study fits: C = FLOPs per sample x samples seen
    compute = summary["compute"]
    assert compute["samples_seen"] == 4 * 8 and compute["global_batch"] == 8
    assert compute["compute_flops"] == pytest.approx(compute["flops_per_sample"] * 32)
    from pretrain.config import load_config
    from pretrain.objectives import build_objective

    rebuilt = build_objective(load_config(run / "config.yaml"))
    assert compute["flops_per_sample"] == pytest.approx(rebuilt.flops_per_sample())
    params = compute["params"]
    assert params["encoder"] == "encoder" and params["total"] == sum(p.numel() for p in rebuilt.eval_bundle().headline[1].parameters())
    assert 0 < params["embedding"] < params["total"] == params["embedding"] + params["non_embedding"]
    # scaling collect reads the run, and refuses one that has not finished
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((run / "config.yaml").read_text())
    assert main(["scaling", "collect", str(run), str(unfinished), "--out", str(tmp_path / "t.csv")]) == 2
    assert "unfinished: no summary.json" in capsys.readouterr().err
    assert main(["scaling", "collect", str(run), str(unfinished), "--out", str(tmp_path / "t.csv"),
                 "--skip-unfinished"]) == 0
    from pretrain.tools.scaling.collect import read_table

    (row,) = read_table(tmp_path / "t.csv")
    assert (row["N"], row["D"], row["steps"]) == (params["non_embedding"], 32, 4)
    assert row["C"] == pytest.approx(compute["compute_flops"]) and row["knn"] == summary["knn_final"]
    # TensorBoard event files hold the loss curve and the reconstruction images.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Scalars("loss/total")][-1] == 4
    assert {"optim/lr", "optim/grad_norm", "perf/samples_per_s", "perf/data_wait_s", "eval/knn_top1", "eval/linear",
            "eval/raw_pixels/linear", "eval/random_init/knn_mean", "eval/encoder/knn_cls",
            "collapse/encoder/cls/rank", "collapse/encoder/patch/cosine"} <= set(events.Tags()["scalars"])
    assert "mae/original_masked_reconstruction" in events.Tags()["images"]
    # The checkpoint keeps only the configured number of complete steps and a valid `latest`.
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000002", "step_00000004"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"


def test_eval_knn_command_on_export_run_dir_and_random_init(tmp_path, capsys):
    from safetensors.torch import save_file

    from pretrain.config import load_config
    from pretrain.models.vit import VisionTransformer
    from pretrain.tools.cli.main import main

    data = tmp_path / "d"
    make_demo_data(data, scale=0.02, splits=["knn_train_2d", "knn_val_2d"], progress=False)
    split_args = ["--train", str(data / "knn_train_2d"), "--val", str(data / "knn_val_2d"), "--k", "5"]
    assert main(["eval", "knn", "--random-init", "configs/demo.yaml", "model.preset=nano", *split_args]) == 0
    random_init = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= random_init["knn_top1"] <= 1.0 and random_init["k"] == 5
    # An export folder made by hand from the same random encoder gives the same accuracy.
    cfg = load_config("configs/demo.yaml", ["model.preset=nano"])
    import torch

    torch.manual_seed(cfg.train.seed)
    encoder = VisionTransformer(cfg.model)
    export = tmp_path / "export"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(export / "model.safetensors"))
    from pretrain.config import config_to_dict

    meta = {"target": "timm", "model": config_to_dict(cfg.model), "preprocessing": {"intensity": "zscore"}}
    (export / "config.json").write_text(json.dumps({"medpretrain": meta}))
    assert main(["eval", "knn", str(export), *split_args]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["knn_top1"] == random_init["knn_top1"]


def test_demo_data_reuses_a_complete_split_only_for_the_same_seed(tmp_path):
    shard = tmp_path / "knn_val_2d" / "shard-000000.tar"
    make_demo_data(tmp_path, scale=0.01, splits=["knn_val_2d"], progress=False)
    first = shard.read_bytes()
    make_demo_data(tmp_path, scale=0.01, splits=["knn_val_2d"], progress=False)
    assert shard.read_bytes() == first
    make_demo_data(tmp_path, scale=0.01, seed=1, splits=["knn_val_2d"], progress=False)
    assert shard.read_bytes() != first


@pytest.mark.slow
def test_dino_demo_run_end_to_end_logs_its_parts_and_exports_the_teacher(tmp_path):
    data = tmp_path / "demo_data"
    make_demo_data(data, scale=0.02, splits=["pretrain_2d", "knn_train_2d", "knn_val_2d"], progress=False)
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "pretrain.tools.cli.main", "train", "configs/dino/demo.yaml", f"train.run_dir={run}",
        f"data.train={data / 'pretrain_2d'}", f"eval.knn_train={data / 'knn_train_2d'}", f"eval.knn_val={data / 'knn_val_2d'}",
        "train.steps=4", "train.log_every=2", "data.batch_size=8", "data.num_workers=1", "model.preset=nano",
        "train.progress=false", "eval.batch_size=16",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "teacher kNN" in proc.stdout + proc.stderr and "student kNN" in proc.stdout + proc.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/dino", "loss/ibot", "loss/koleo", "schedule/teacher_temp", "schedule/momentum",
            "eval/teacher/linear", "eval/student/linear", "eval/teacher/knn_mean",
            *(f"collapse/{t}/{k}/{s}" for t in ("teacher", "student") for k in ("cls", "patch") for s in ("std", "cosine", "rank")),
            *(f"collapse/{t}/{s}" for t in ("teacher/cls_targets", "student/cls_predictions")
              for s in ("entropy", "marginal_entropy")),
            } <= tags, tags
    entropy = [e.value for e in events.Scalars("collapse/student/cls_predictions/entropy")]
    assert all(0 < v <= 1 + 1e-6 for v in entropy), entropy
    temps = [e.value for e in events.Scalars("schedule/teacher_temp")]
    assert temps == sorted(temps) and temps[0] >= 0.04
    # The export is the teacher, and timm loads it from the hub layout (strictly).
    import timm
    import torch

    from pretrain.tools.export.source import trained_objective

    objective, _ = trained_objective(run / "checkpoints" / "step_00000004")
    model = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True)
    teacher = objective.teacher.backbone.state_dict()
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], teacher["blocks.0.attn.qkv.weight"])
