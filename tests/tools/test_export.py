"""Export: consolidated fp32 encoder weights that load into timm with no key left over."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import subprocess
import sys

from pretrain.config import load_config
from pretrain.tools.demo.data import make_demo_data
from pretrain.tools.export.encoder import export_encoder, load_exported_encoder, load_into_timm

TINY = [
    "model.preset=nano", "model.img_size=32", "objective.decoder_dim=32", "objective.decoder_depth=1",
    "objective.decoder_heads=2", "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=16",
    "train.steps=3", "train.progress=false", "train.threads=1", "eval.knn_train=null", "eval.knn_val=null",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    make_demo_data(out, scale=0.01, splits=["pretrain_2d"], progress=False)
    return out / "pretrain_2d"


@pytest.mark.slow
@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (3, "bf16")])
def test_export_loads_into_timm_strict_with_same_features(tmp_path, shards, stage, precision):
    run = tmp_path / "run"
    overrides = [*TINY, f"data.train={shards}", f"train.run_dir={run}", f"train.zero_stage={stage}",
                 f"train.precision={precision}", "model.num_register_tokens=2", "model.layer_scale_init=1e-4"]
    # A process of its own: DeepSpeed keeps process-group state that outlives one training run.
    proc = subprocess.run([sys.executable, "-m", "pretrain.tools.cli.main", "train", "configs/demo.yaml", *overrides, "--no-export"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    cfg = load_config("configs/demo.yaml", overrides)
    out = export_encoder(run, tmp_path / "export")
    weights = load_file(str(out / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())
    meta = json.loads((out / "config.json").read_text())
    assert meta["step"] == 3 and meta["model"]["num_register_tokens"] == 2

    ours = load_exported_encoder(out).eval()
    timm_model = load_into_timm(out).eval()  # strict=True inside
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), ours(x), atol=1e-5, rtol=1e-5)
    # The exported weights are the trained ones, not the initialisation.
    torch.manual_seed(cfg.train.seed)
    from pretrain.objectives import build_objective

    init = build_objective(cfg).eval_bundle().headline[1].state_dict()
    assert not torch.allclose(init["blocks.0.attn.qkv.weight"], weights["blocks.0.attn.qkv.weight"])


def test_export_without_checkpoint_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        export_encoder(tmp_path, tmp_path / "out")
