"""Export: hub folders that timm and MONAI load, in a process where medpretrain cannot be imported,
giving the trained encoder's features; model cards with the run's numbers; push --dry-run; no pickles.

The fast tests export checkpoints written here without training (the objective's freshly built
weights in the layout a ZeRO-0 DeepSpeed checkpoint has, perturbed so that no weight keeps its
initial value); the slow ones export real training runs.
"""
from __future__ import annotations

import json
import os
import re
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
if library == "open_clip":  # as the card writes it: local-dir, offline, the grey image in R, G and B
    import numpy as np, open_clip
    from PIL import Image
    from transformers import AutoModel, AutoTokenizer
    texts = json.loads(sys.argv[5])
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    grey = Image.fromarray(load_file(inputs)["grey"].numpy())  # an 8-bit grey image through open_clip's transform
    text_model, text_tokenizer = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        tokens = text_tokenizer(texts, padding=True, return_tensors="pt")
        out = {"image": model.encode_image(x.expand(-1, 3, -1, -1), normalize=True),
               "preprocessed": model.encode_image(preprocess(grey)[None], normalize=True),
               "text": model.encode_text(tokenizer(texts), normalize=True), "scale": model.logit_scale.exp().reshape(1),
               "hidden": text_model(**tokens).last_hidden_state, "mask": tokens["attention_mask"]}
        if getattr(model, "logit_bias", None) is not None:
            out["bias"] = model.logit_bias.reshape(1)
elif library == "timm":
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


def isolated_features(library: str, folder: Path, x: torch.Tensor, tmp_path: Path, *extra: str,
                      inputs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    save_file({"x": x.contiguous(), **(inputs or {})}, str(tmp_path / "x.safetensors"))
    proc = subprocess.run([sys.executable, "-c", ISOLATED_LOADER, library, str(folder), str(tmp_path / "x.safetensors"),
                           str(tmp_path / "y.safetensors"), *extra], capture_output=True, text=True, timeout=300,
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


def test_pickle_check_tells_safetensors_from_pickles(tmp_path):
    import pickle

    # a safetensors header of 0x?80 bytes starts with 0x80, as a pickle's PROTO opcode does
    for n in range(1, 200):
        save_file({"w": torch.zeros(n)}, str(tmp_path / "w.safetensors"), metadata={"pad": "x" * n})
        if (tmp_path / "w.safetensors").read_bytes()[0] == 0x80:
            break
    assert (tmp_path / "w.safetensors").read_bytes()[0] == 0x80
    (tmp_path / "p.pkl").write_bytes(pickle.dumps({"w": [1.0]}, protocol=5))
    (tmp_path / "p2.pkl").write_bytes(pickle.dumps({"w": [1.0]}, protocol=2))
    assert pickled_files(tmp_path) == ["p.pkl", "p2.pkl"]


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


# ------------------------------------------------------------------ CLIP runs: open_clip (both towers) and transformers

TEXTS = ["No pleural effusion.", "Multiple solid nodules in both lungs.", "normal"]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> str:
    from pretrain.tools.demo.text_tower import build_text_tower

    corpus = TEXTS * 4 + ["Thin-walled cysts in the left lung.", "Short linear bands in the right lung."]
    return str(build_text_tower(tmp_path_factory.mktemp("text") / "tower", corpus))


def clip_run(tmp_path: Path, text_model: str, *overrides: str) -> Path:
    return fake_run(tmp_path, "configs/clip/demo.yaml", [
        "model.preset=nano", "model.img_size=32", "model.patch_size=8", "objective.embed_dim=32",
        "objective.max_tokens=24", "objective.image_pool=mean", f"objective.text_model={text_model}", *overrides])


CLIP_VARIANTS = [
    pytest.param(["data.intensity=range"], id="vit-mean-infonce"),
    pytest.param(["objective.image_pool=cls", "objective.text_pool=cls", "objective.projection=mlp", "objective.loss=siglip",
                  "model.layer_scale_init=0.1", "model.qkv_bias=false", "model.pos_embed=learned", "data.intensity=range"],
                 id="vit-cls-siglip-mlp-layerscale"),
    pytest.param(["model.name=timm:resnet18", "data.intensity=range"], id="timm-resnet18"),
]


@pytest.mark.parametrize("variant", CLIP_VARIANTS)
def test_clip_export_loads_in_open_clip_and_transformers_without_medpretrain(tmp_path, text_model, variant):
    from pretrain.tools.export.source import open_trained_encoder

    run = clip_run(tmp_path, text_model, *variant)
    out = export_encoder(run, tmp_path / "export")  # a 2D CLIP run: open_clip by default
    names = sorted(p.name for p in out.iterdir())
    assert {"open_clip_config.json", "open_clip_model.safetensors", "config.json", "model.safetensors", "README.md",
            "tokenizer.json", "tokenizer_config.json"} <= set(names), names
    assert pickled_files(out) == []
    item = open_trained_encoder(run)
    clip = item.objective
    x = torch.randn(3, 1, 32, 32)
    grey = torch.randint(0, 256, (32, 32), dtype=torch.uint8)
    theirs = isolated_features("open_clip", out, x, tmp_path, json.dumps(TEXTS), inputs={"grey": grey})
    with torch.no_grad():
        torch.testing.assert_close(theirs["image"], clip.embed_images(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs["text"], clip.embed_texts(TEXTS), atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs["scale"], clip.scale().reshape(1), atol=1e-4, rtol=1e-6)
        if clip.logit_bias is not None:
            torch.testing.assert_close(theirs["bias"], clip.logit_bias.detach().reshape(1))
        # open_clip's own transform on an 8-bit grey image is this run's `range` normalisation
        torch.testing.assert_close(theirs["preprocessed"], clip.embed_images(grey[None, None].float() / 255),
                                   atol=1e-5, rtol=0)
        # the text transformer alone, with transformers: our tower's token states
        tokens = clip.data_recipe().tokenizer(TEXTS, padding=True, return_tensors="pt")
        ours = clip.text.transformer(**tokens).last_hidden_state
        keep = theirs["mask"].bool()
        torch.testing.assert_close(theirs["hidden"][keep], ours[keep], atol=1e-5, rtol=0)
        # medpretrain reads the image tower back (pretrain eval on the export)
        encoder, intensity, pool = load_encoder(out)
        torch.testing.assert_close(encoder.eval()(x), item.encoder(x), atol=1e-5, rtol=0)
    assert (intensity, pool) == ("range", clip.cfg.image_pool)
    card = (out / "README.md").read_text()
    assert "library_name: open_clip" in card and "pipeline_tag: zero-shot-image-classification" in card
    assert text_model not in card  # the local text tower's path is not shown


def test_clip_export_moves_and_pushes_naming_its_text_tower(tmp_path, text_model):
    from pretrain.tools.export.open_clip_target import load
    from pretrain.tools.export.push import as_uploaded

    run = clip_run(tmp_path, text_model)
    out = export_encoder(run, tmp_path / "export", repo_id="acme/cxr-clip")
    moved = tmp_path / "elsewhere" / "clip"
    moved.parent.mkdir()
    out.rename(moved)
    model, tokenizer = load(moved)  # the card's snippet for a moved folder
    with torch.no_grad():
        assert model.encode_text(tokenizer(TEXTS), normalize=True).shape == (3, 32)
    # pushed, the config names the repository (hf-hub:acme/cxr-clip reads its own config.json and tokenizer)
    with as_uploaded(moved, "acme/cxr-clip") as view:
        text_cfg = json.loads((view / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
        assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == "acme/cxr-clip"
        assert (view / "open_clip_model.safetensors").read_bytes() == (moved / "open_clip_model.safetensors").read_bytes()
    assert json.loads((moved / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]["hf_model_name"] == str(out)
    files = push(moved, "acme/cxr-clip", dry_run=True)
    assert [f for f, _ in files] == sorted(p.name for p in moved.iterdir())
    card = (moved / "README.md").read_text()
    assert 'open_clip.create_model_and_transforms("hf-hub:acme/cxr-clip")' in card


def test_clip_exports_open_clip_cannot_hold_are_refused_or_export_the_image_tower(tmp_path, text_model, caplog):
    run = clip_run(tmp_path, text_model, "objective.image_pool=cls+mean")
    with pytest.raises(ExportError, match="pool the class token or the patch mean, not both"):
        export_encoder(run, tmp_path / "export", target="open_clip")
    with caplog.at_level("WARNING"):
        out = export_encoder(run, tmp_path / "export")  # by default: the image tower alone, for timm
    assert "image tower alone" in caplog.text
    assert json.loads((out / "config.json").read_text())["medpretrain"]["target"] == "timm"
    mae = fake_run(tmp_path / "mae", "configs/demo.yaml", MAE_2D)
    with pytest.raises(ExportError, match="image-text models"):
        export_encoder(mae, tmp_path / "export2", target="open_clip")


# ------------------------------------------------------------------ real training runs (slow)

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    make_demo_data(out, scale=0.01, splits=["pretrain_2d", "pretrain_3d"], progress=False, text_tower=True)
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


@pytest.mark.slow
def test_trained_clip_run_exports_to_open_clip(tmp_path, shards):
    run = tmp_path / "run"
    args = [*TINY, "model.preset=nano", "model.img_size=32", "objective.image_pool=mean", "objective.embed_dim=32",
            "objective.max_tokens=32", f"objective.text_model={shards / 'text_tower'}", f"data.train={shards / 'pretrain_2d'}",
            f"train.run_dir={run}"]
    proc = subprocess.run([sys.executable, "-m", "pretrain.tools.cli.main", "train", "configs/clip/demo.yaml", *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(json.loads((run / "summary.json").read_text())["export"])
    assert json.loads((out / "open_clip_config.json").read_text())["medpretrain"]["step"] == 3
    from pretrain.tools.export.source import open_trained_encoder

    clip = open_trained_encoder(run).objective
    x = torch.randn(2, 1, 32, 32)
    theirs = isolated_features("open_clip", out, x, tmp_path, json.dumps(TEXTS),
                               inputs={"grey": torch.zeros(32, 32, dtype=torch.uint8)})
    with torch.no_grad():
        torch.testing.assert_close(theirs["image"], clip.embed_images(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs["text"], clip.embed_texts(TEXTS), atol=1e-5, rtol=0)


def test_non_finite_weights_are_never_exported(tmp_path, capsys):
    run = fake_run(tmp_path, "configs/demo.yaml", MAE_2D)
    model = run / "checkpoints" / "step_00000007" / "mp_rank_00_model_states.pt"
    state = torch.load(model, weights_only=False)
    encoder_keys = [k for k in state["module"] if k.startswith("backbone.") and state["module"][k].is_floating_point()]
    for key in encoder_keys[:7]:
        state["module"][key] = torch.full_like(state["module"][key], float("nan"))
    state["module"][encoder_keys[-1]][0] = float("inf")
    torch.save(state, model)
    assert main(["export", str(run), str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err.strip()
    named = re.search(r"8 of \d+ tensors hold NaN or inf \(([^)]*)\)", err)
    assert err.count("\n") == 0 and named, err
    assert named.group(1).split(", ") == [*(k.removeprefix("backbone.") for k in encoder_keys[:5]), "..."], err
    assert not (tmp_path / "export").exists()
