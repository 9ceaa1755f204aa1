"""Loss-regression files: the first logged losses of short deterministic CPU runs, pinned absolutely.

A silent change of a loss, its weighting, an initialisation, the data order or
an augmentation moves these curves; a collapse flattens them. The files are
``tests/assets/losses/<name>.json``; after an intended change, rewrite them with
``MEDPRETRAIN_WRITE_LOSS_ASSETS=1 make test PYTEST_ARGS="tests/test_loss_regression.py"`` and say why in
the commit. The tolerance allows for float differences between CPUs (vector widths change summation order).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pretrain.tools.demo.data import make_demo_data

pytestmark = pytest.mark.slow
ASSETS = Path(__file__).parent / "assets" / "losses"
STEPS = 12
COMMON = ["data.batch_size=8", "data.num_workers=1", "train.progress=false", "train.log_every=1",
          f"train.steps={STEPS}", f"train.ckpt_every={STEPS}", "train.export_on_end=false", "eval.at_start=false",
          "train.threads=1", "model.preset=nano"]
RUNS = {
    "mae_demo_nano": ("configs/demo.yaml", ["optim.warmup_steps=2"]),
    # DINOv2's loss weights, as the curve was committed with (all three terms at work)
    "dino_demo_nano": ("configs/dino/demo.yaml", ["optim.warmup_steps=2", "objective.prototypes=128",
                                                  "objective.head_hidden_dim=64", "objective.head_bottleneck_dim=32",
                                                  "objective.dino_weight=1", "objective.koleo_weight=0.1",
                                                  "objective.mask_probability=0.5"]),
    # the Hamming loss is discrete: its curve pins the matchings, the affinity margins pin the features
    "lvm_med_demo_nano": ("configs/lvm_med/demo.yaml", ["optim.warmup_steps=2", "objective.group_size=8",
                                                        "objective.knn=3"]),
}
# Steps pinned point by point (default: all). LVM-Med's loss and backward are discrete solves: from its first
# update on, a float difference between CPUs (summation order with other vector widths) flips a matching and
# the curves part (measured: equal for 2 steps, then 6 % apart in the affinity margin on this session's machine). Its
# later steps are held to their means: what a sign error, a dead gradient or a collapse would move.
EXACT_STEPS = {"lvm_med_demo_nano": 2}
MEAN_TOLERANCE = {"loss/total": 0.1, "loss/match_accuracy": 0.1, "loss/graph_degree": 0.3}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    make_demo_data(out, scale=0.02, splits=["pretrain_2d"], progress=False)
    return out / "pretrain_2d"


@pytest.mark.parametrize("name", list(RUNS))
def test_first_losses_match_the_committed_curve(name, shards, tmp_path):
    config, overrides = RUNS[name]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain.tools.cli.main", "train", config, f"train.run_dir={run}",
           f"data.train={shards}", "eval.knn_train=null", "eval.knn_val=null", *COMMON, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = {k: [r[k] for r in rows] for k in rows[0] if k.startswith("loss/")}
    assert len(curve["loss/total"]) == STEPS
    asset = ASSETS / f"{name}.json"
    if os.environ.get("MEDPRETRAIN_WRITE_LOSS_ASSETS") == "1":
        asset.write_text(json.dumps({"config": config, "overrides": COMMON + overrides, "losses": curve}, indent=1) + "\n")
    expected = json.loads(asset.read_text())["losses"]
    assert sorted(curve) == sorted(expected)
    n = EXACT_STEPS.get(name, STEPS)
    for key in expected:
        np.testing.assert_allclose(curve[key][:n], expected[key][:n], rtol=2e-3, atol=1e-4, err_msg=f"{name} {key}")
    if n < STEPS:
        for key, tol in MEAN_TOLERANCE.items():
            now, then = np.mean(curve[key][n:]), np.mean(expected[key][n:])
            assert abs(now - then) <= tol, f"{name} {key}: mean of steps {n + 1}-{STEPS} {now:.4f}, committed {then:.4f}"
