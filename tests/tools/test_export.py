"""Export: hub folders that timm and MONAI load, in a process where medpretrain cannot be imported,
giving the trained encoder's features; model cards with the run's numbers; push --dry-run; no pickles.

The fast tests export checkpoints written here without training (the objective's freshly built
weights in the layout a ZeRO-0 DeepSpeed checkpoint has, perturbed so that no weight keeps its
initial value); the slow ones export real training runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pretrain.config import dump_config, load_config
from pretrain.objectives import build_objective
from pretrain.tools.cli.main import main
from pretrain.tools.demo.data import make_demo_data
from pretrain.tools.export.encoder import ExportError, export_encoder, load_encoder, load_exported_encoder
from pretrain.tools.export.push import PushError, pickled_files, push

MAE_2D = ["model.preset=nano", "model.img_size=32", "model.patch_size=8", "objective.decoder_dim=32",
          "objective.decoder_depth=1", "objective.decoder_heads=2"]
MAE_3D = ["model.preset=nano", "model.img_size=16", "model.patch_size=8", "objective.decoder_dim=32",
          "objective.decoder_depth=1", "objective.decoder_heads=2"]

# Runs in a fresh interpreter: any import of medpretrain fails there, as on a machine without it.
ISOLATED_LOADER = r'''
import importlib.abc, json, sys
class NoMedpretrain(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pretrain" or name.startswith("pretrain."):
            raise ImportError(f"medpretrain is not importable here ({name})")
sys.meta_path.insert(0, NoMedpretrain())
import torch
from safetensors.torch import load_file, save_file
library, folder, inputs, outputs = sys.argv[1:5]
x = load_file(inputs)["x"]
config = json.load(open(f"{folder}/config.json"))
if library == "timm":
    import timm
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        out = {"embedding": model(x)}
        if config["architecture"].startswith(("vit_", "aimv2_")):
            out["tokens"] = model.forward_features(x)
else:  # what the model card tells MONAI users to write
    import importlib
    module, _, name = config["class"].rpartition(".")
    net = getattr(importlib.import_module(module), name)(**config["args"])
    if "classification_head" in config["after_init"]:
        net.classification_head = torch.nn.Identity()
    for layer in net.modules():
        if isinstance(layer, torch.nn.LayerNorm) and "layer_norm_eps" in config["after_init"]:
            layer.eps = config["after_init"]["layer_norm_eps"]
    net.load_state_dict(load_file(f"{folder}/model.safetensors"), strict=True)
    net.eval()
    with torch.no_grad():
        out = {"net(x)": lambda: net(x), "net(x)[0]": lambda: net(x)[0]}[config["embedding"]]()  # as the card writes it
    if config["pool_spatial"]:
        out = out.flatten(2).mean(dim=2)
    out = {"embedding": out}
assert not [m for m in sys.modules if m == "pretrain" or m.startswith("pretrain.")]
save_file({k: v.contiguous() for k, v in out.items()}, outputs)
'''


def fake_run(tmp_path: Path, config: str, overrides: list[str], step: int = 7, summary: dict | None = None) -> Path:
    """A run directory with one complete checkpoint of ``config``'s objective, as DeepSpeed ZeRO-0 lays it out."""
    cfg = load_config(config, [*overrides, f"train.run_dir={tmp_path / 'run'}"])
    torch.manual_seed(0)
    objective = build_objective(cfg)
    with torch.no_grad():  # away from the initialisation (LayerScale, zero biases, ...): every weight matters
        for p in objective.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = Path(cfg.train.run_dir)
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    torch.save({"module": objective.state_dict()}, ckpt / "mp_rank_00_model_states.pt")
    (ckpt / "config.yaml").write_text(dump_config(cfg))
    (ckpt / "COMPLETE").write_text(f"{step}\n")
    (run / "checkpoints" / "latest").write_text(ckpt.name)
    if summary is not None:
        (run / "summary.json").write_text(json.dumps({**summary, "checkpoint": str(ckpt)}))
    return run


def isolated_features(library: str, folder: Path, x: torch.Tensor, tmp_path: Path) -> dict[str, torch.Tensor]:
    save_file({"x": x.contiguous()}, str(tmp_path / "x.safetensors"))
    proc = subprocess.run([sys.executable, "-c", ISOLATED_LOADER, library, str(folder), str(tmp_path / "x.safetensors"),
                           str(tmp_path / "y.safetensors")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(tmp_path / "y.safetensors"))


def ours_on(run: Path, x: torch.Tensor, encoder: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding, tokens) of the trained encoder, computed by medpretrain from the checkpoint."""
    from pretrain.tools.export.source import open_trained_encoder

    enc = open_trained_encoder(run, encoder).encoder.eval()
    with torch.no_grad():
        return enc(x), enc.forward_features(x)


VIT_2D = [
    pytest.param([], id="gelu"),
    pytest.param(["model.num_register_tokens=2", "model.layer_scale_init=0.1", "model.pos_embed=learned"],
                 id="registers-layerscale"),
    pytest.param(["model.preset=null", "model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.mlp=swiglu",
                  "model.mlp_ratio=2.0", "model.qkv_bias=false", "model.img_size=[32,48]"],
                 id="swiglu-no-qkv-bias-nonsquare"),
]


@pytest.mark.parametrize("variant", VIT_2D)
def test_2d_vit_export_loads_in_timm_without_medpretrain(tmp_path, variant):
    run = fake_run(tmp_path, "configs/demo.yaml", [*MAE_2D, *variant])
    out = export_encoder(run, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    size = load_config(run / "checkpoints" / "step_00000007" / "config.yaml").model.img_size_tuple()
    x = torch.randn(3, 1, *size)
    theirs = isolated_features("timm", out, x, tmp_path)
    embedding, tokens = ours_on(run, x)
    torch.testing.assert_close(theirs["embedding"], embedding, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs["tokens"], tokens, atol=1e-5, rtol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 0 and config["pretrained_cfg"]["input_size"] == [1, *size]
    assert config["pretrained_cfg"]["fixed_input_size"] is True
    assert pickled_files(out) == []
    # medpretrain reads its own export back (pretrain eval, init_from)
    with torch.no_grad():
        torch.testing.assert_close(load_exported_encoder(out).eval()(x), embedding, atol=0, rtol=0)


@pytest.mark.parametrize("layer_scale", [None, 0.1])
def test_3d_vit_export_loads_in_monai_without_medpretrain(tmp_path, layer_scale):
    extra = [f"model.layer_scale_init={layer_scale}"] if layer_scale else []
    run = fake_run(tmp_path, "configs/demo3d.yaml", [*MAE_3D, "model.pos_embed=learned", *extra])
    out = export_encoder(run, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["class"] == "monai.networks.nets.ViT" and config["args"]["qkv_bias"] is True
    x = torch.randn(2, 1, 16, 16, 16)
    theirs = isolated_features("monai", out, x, tmp_path)
    embedding, _ = ours_on(run, x)
    torch.testing.assert_close(theirs["embedding"], embedding, atol=1e-5, rtol=0)
    card = (out / "README.md").read_text()
    assert "library_name: monai" in card and "layer.eps = 1e-06" in card
    assert "Not a drop-in `UNETR` encoder" in card and "12 layers" in card
    with torch.no_grad():  # medpretrain reads it back (LayerScale folded: gamma 1, same function)
        torch.testing.assert_close(load_exported_encoder(out).eval()(x), embedding, atol=1e-5, rtol=0)
    # continued pretraining from the MONAI-layout weights gives the same encoder
    from pretrain.models.pretrained import load_pretrained
    from pretrain.models.vit import VisionTransformer, ViTConfig

    fresh = VisionTransformer(ViTConfig(**_vit_fields(out)))
    report = load_pretrained(fresh, out)
    assert not report["missing"], report
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), embedding, atol=1e-5, rtol=0)


def _vit_fields(out: Path) -> dict:
    """The exported ViT's config without LayerScale (folded into the projections) and the backbone name."""
    model = dict(json.loads((out / "config.json").read_text())["medpretrain"]["model"])
    model.pop("name")
    model.pop("kwargs")
    model["layer_scale_init"] = None
    return model


@pytest.mark.parametrize("config, overrides, library", [
    ("configs/dino/demo_resnet50.yaml", ["model.name=timm:resnet18"], "timm"),
    ("configs/dino/demo3d_monai.yaml", [], "monai"),
])
def test_cnn_backbones_export_to_their_own_library(tmp_path, config, overrides, library):
    run = fake_run(tmp_path, config, [*overrides, "objective.prototypes=64", "objective.head_hidden_dim=64",
                                      "objective.head_bottleneck_dim=32"])
    out = export_encoder(run, tmp_path / "export", encoder="student")
    meta = json.loads((out / "config.json").read_text())["medpretrain"]
    assert meta["target"] == library and meta["encoder"] == "student"
    size = load_config(run / "checkpoints" / "step_00000007" / "config.yaml").model.img_size_tuple()
    x = torch.randn(2, 1, *size)
    theirs = isolated_features(library, out, x, tmp_path)
    embedding, _ = ours_on(run, x, "student")
    torch.testing.assert_close(theirs["embedding"], embedding, atol=1e-5, rtol=0)
    teacher, _ = ours_on(run, x, "teacher")
    assert not torch.allclose(teacher, embedding)  # --encoder picked the student, not the headline


def test_refused_mappings_name_the_reason(tmp_path, capsys):
    run = fake_run(tmp_path, "configs/demo3d.yaml", [*MAE_3D, "model.num_register_tokens=1"])
    with pytest.raises(ExportError, match="register tokens"):
        export_encoder(run, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    run2 = fake_run(tmp_path / "b", "configs/demo.yaml", [*MAE_2D, "model.mlp=swiglu"])
    with pytest.raises(ExportError, match="GELU MLP only"):
        export_encoder(run2, tmp_path / "export", target="monai")
    with pytest.raises(ExportError, match="has encoders encoder"):
        export_encoder(run2, tmp_path / "export", encoder="teacher")
    # the CLI says the same in one line on stderr, no traceback
    assert main(["export", str(run), str(tmp_path / "export")]) == 2
    assert main(["export", str(run2), str(tmp_path / "export"), "--encoder", "teacher"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "register tokens" in err[0] and "--encoder 'teacher'" in err[1], err


def test_card_carries_the_run_numbers_and_no_paths(tmp_path):
    ev = {"raw_pixels": {"knn": 0.31, "linear": 0.365}, "random_init": {"knn": 0.33, "knn_cls": 0.33, "knn_mean": 0.3,
                                                                       "linear": 0.42},
          "pretrained": {"knn": 0.512, "knn_cls": 0.512, "knn_mean": 0.47, "linear": 0.614, "encoder": "encoder"},
          "gain_over_baselines": {"linear": 0.194, "knn": 0.182}}
    run = fake_run(tmp_path, "configs/demo.yaml", MAE_2D,
                   summary={"steps": 7, "world_size": 2, "wall_seconds": 1800.0, "eval": ev})
    # the manifest of the training shards feeds the data section
    shards = tmp_path / "shards"
    make_demo_data(shards, scale=0.01, splits=["pretrain_2d"], progress=False)
    cfg_path = run / "checkpoints" / "step_00000007" / "config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace("demo_data/pretrain_2d", str(shards / "pretrain_2d")))
    out = export_encoder(run, tmp_path / "export", license="apache-2.0", repo_id="acme/cxr-mae")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\nlicense: apache-2.0\n")
    assert "| **this encoder** (encoder) | 51.2 % | 47.0 % | 51.2 % | 61.4 % |" in card
    assert "| raw pixels (the view pooled to the encoder's grid) | — | — | 31.0 % | 36.5 % |" in card
    assert "linear +19.4 points" in card and "1.000 device-hours" in card
    assert "global batch 128 (64 per rank x 1 accumulation x 2 rank(s))" in card
    assert "80 samples" in card and "4 classes" in card
    assert 'timm.create_model("hf-hub:acme/cxr-mae", pretrained=True)' in card
    assert str(tmp_path) not in card and str(tmp_path) not in (out / "config.json").read_text()


def test_push_dry_run_lists_exactly_the_files_and_refuses_pickles(tmp_path, capsys):
    run = fake_run(tmp_path, "configs/demo.yaml", MAE_2D)
    out = export_encoder(run, tmp_path / "export")
    files = push(out, "acme/cxr-mae", dry_run=True)
    assert files == [(p.name, p.stat().st_size) for p in sorted(out.iterdir())]
    # every file (the safetensors, which is written through a private temporary file, too) has the mode a
    # plain open() gives under this umask, and the folder a plain mkdir's
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert main(["export", "push", str(out), "acme/cxr-mae", "--dry-run", "--revision", "v1"]) == 0
    printed = capsys.readouterr().out
    assert "3 files would be uploaded to acme/cxr-mae@v1" in printed and "model.safetensors" in printed
    with pytest.raises(PushError, match="OWNER/NAME"):
        push(out, "no-owner", dry_run=True)
    torch.save({"w": torch.ones(2)}, out / "extra.bin")
    with pytest.raises(PushError, match="extra.bin look like pickles"):
        push(out, "acme/cxr-mae", dry_run=True)
    assert main(["export", "push", str(tmp_path), "acme/x", "--dry-run"]) == 2


def test_failed_export_keeps_the_previous_one(tmp_path):
    run = fake_run(tmp_path, "configs/demo.yaml", MAE_2D)
    out = export_encoder(run, tmp_path / "export")
    before = (out / "model.safetensors").read_bytes()
    refused = fake_run(tmp_path / "b", "configs/demo3d.yaml", [*MAE_3D, "model.num_register_tokens=1"])
    with pytest.raises(ExportError):
        export_encoder(refused, out)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export.")] == []


def test_eval_reads_an_export_back(tmp_path):
    run = fake_run(tmp_path, "configs/demo3d.yaml", [*MAE_3D, "data.intensity=range"])
    out = export_encoder(run, tmp_path / "export")
    encoder, intensity, pool = load_encoder(out)
    assert (intensity, pool) == ("range", "cls") and encoder.cfg.spatial_dims == 3


def test_export_without_checkpoint_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        export_encoder(tmp_path, tmp_path / "out")


# ------------------------------------------------------------------ real training runs (slow)

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    make_demo_data(out, scale=0.01, splits=["pretrain_2d", "pretrain_3d"], progress=False)
    return out


TINY = ["data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=16", "train.steps=3", "train.progress=false",
        "train.threads=1", "eval.knn_train=null", "eval.knn_val=null"]


@pytest.mark.slow
@pytest.mark.parametrize("config, overrides, dims, stage, precision", [
    ("configs/demo.yaml", [*MAE_2D, "model.num_register_tokens=2", "model.layer_scale_init=1e-4"], 2, 3, "bf16"),
    ("configs/demo3d.yaml", [*MAE_3D, "model.layer_scale_init=0.1"], 3, 0, "fp32"),
])
def test_trained_run_exports_and_loads_without_medpretrain(tmp_path, shards, config, overrides, dims, stage, precision):
    run = tmp_path / "run"
    args = [*TINY, *overrides, f"data.train={shards / f'pretrain_{dims}d'}", f"train.run_dir={run}",
            f"train.zero_stage={stage}", f"train.precision={precision}"]
    # A process of its own: DeepSpeed keeps process-group state that outlives one training run.
    proc = subprocess.run([sys.executable, "-m", "pretrain.tools.cli.main", "train", config, *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    out = Path(summary["export"])  # exported at the end of the run
    weights = load_file(str(out / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert json.loads((out / "config.json").read_text())["medpretrain"]["step"] == 3
    size = load_config(config, args).model.img_size_tuple()
    x = torch.randn(2, 1, *size)
    theirs = isolated_features("timm" if dims == 2 else "monai", out, x, tmp_path)
    embedding, _ = ours_on(run, x)
    torch.testing.assert_close(theirs["embedding"], embedding, atol=1e-5, rtol=0)
    # the exported weights are the trained ones, not the initialisation
    torch.manual_seed(0)
    init = build_objective(load_config(config, args)).eval_bundle().headline[1]
    with torch.no_grad():
        assert not torch.allclose(init.eval()(x), embedding, atol=1e-4)
