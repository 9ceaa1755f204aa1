"""DINO with a timm ResNet-50 (1 channel) and with a MONAI 3D ResNet, through the same trainer, with kNN."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pretrain.tools.demo.data import make_demo_data

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("config, dims", [("configs/dino/demo_resnet50.yaml", 2), ("configs/dino/demo3d_monai.yaml", 3)])
def test_dino_trains_a_timm_and_a_monai_backbone_and_reports_knn(tmp_path, config, dims):
    data = tmp_path / "data"
    make_demo_data(data, scale=0.02, splits=[f"pretrain_{dims}d", f"knn_train_{dims}d", f"knn_val_{dims}d"],
                   progress=False)
    run = tmp_path / "run"
    proc = subprocess.run([
        sys.executable, "-m", "pretrain.tools.cli.main", "train", config, f"train.run_dir={run}",
        f"data.train={data / f'pretrain_{dims}d'}", f"eval.knn_train={data / f'knn_train_{dims}d'}",
        f"eval.knn_val={data / f'knn_val_{dims}d'}", "train.steps=3", "train.log_every=1", "data.batch_size=4",
        "data.num_workers=1", "train.progress=false", "eval.every=0", "eval.batch_size=16",
    ], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    assert 0.0 <= summary["knn_init"] <= 1.0 and 0.0 <= summary["knn_final"] <= 1.0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss/total"]) for r in rows)
    assert "loss/ibot" not in rows[0] and rows[0]["schedule/momentum"] > 0
    # the export is the teacher backbone; it reloads from its own config
    meta = json.loads((run / "export" / "config.json").read_text())["medpretrain"]
    assert meta["model"]["name"] == ("timm:resnet50" if dims == 2 else "monai:resnet10") and meta["encoder"] == "teacher"
