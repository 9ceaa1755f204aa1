"""Config schema: YAML + dotted overrides -> typed dataclasses, errors that name the key."""
from __future__ import annotations

import pytest
import yaml

from pretrain.config import ConfigError, dump_config, load_config
from pretrain.config.load import apply_override


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_demo_config_loads_and_round_trips(tmp_path):
    cfg = load_config("configs/demo.yaml")
    assert cfg.objective.name == "mae" and cfg.model.embed_dim == 128
    again = load_config(write(tmp_path, "resolved.yaml", yaml.safe_load(dump_config(cfg))))
    assert again == cfg


def test_overrides_set_typed_values():
    cfg = load_config("configs/demo.yaml", ["optim.lr=3e-4", "train.steps=7", "objective.mask_ratio=0.6", "data.train=a/b"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7 and cfg.objective.mask_ratio == 0.6
    assert cfg.data.train[0].shards == "a/b" and cfg.data.train[0].weight == 1.0


def test_unknown_key_names_key_and_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'.*did you mean 'optim\.lr'"):
        load_config("configs/demo.yaml", ["optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"'objective\.mask_ration'.*'objective\.mask_ratio'"):
        load_config("configs/demo.yaml", ["objective.mask_ration=0.5"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*did you mean 'train'"):
        load_config(None, ["trian.steps=3"])


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError, match=r"'train\.steps' expects an integer, got 'many'"):
        load_config("configs/demo.yaml", ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"'train\.progress' expects true/false"):
        load_config("configs/demo.yaml", ["train.progress=3"])
    with pytest.raises(ConfigError, match=r"'optim\.betas' expects 2 items"):
        load_config("configs/demo.yaml", ["optim.betas=[0.9]"])
    with pytest.raises(ConfigError, match=r"'train\.precision' must be one of .*did you mean 'bf16'"):
        load_config("configs/demo.yaml", ["train.precision=bf61"])


def test_value_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"train\.zero_stage"):
        load_config("configs/demo.yaml", ["train.zero_stage=4"])
    with pytest.raises(ConfigError, match=r"objective.*mask_ratio"):
        load_config("configs/demo.yaml", ["objective.mask_ratio=1.5"])
    with pytest.raises(ConfigError, match=r"unknown objective 'maee'.*did you mean 'mae'"):
        load_config("configs/demo.yaml", ["objective.name=maee"])


def test_base_chain_merges_and_rejects_loops(tmp_path):
    write(tmp_path, "base.yaml", {"train": {"steps": 5, "seed": 3}, "optim": {"lr": 0.1}})
    child = write(tmp_path, "child.yaml", {"base": "base.yaml", "train": {"steps": 9}})
    cfg = load_config(child)
    assert (cfg.train.steps, cfg.train.seed, cfg.optim.lr) == (9, 3, 0.1)
    write(tmp_path, "a.yaml", {"base": "b.yaml"})
    write(tmp_path, "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_bad_files_and_overrides_are_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_override({}, "train.steps")
    with pytest.raises(ConfigError, match=r"'data\.train\.5'"):
        load_config("configs/demo.yaml", ["data.train.5.weight=2"])


def test_every_shipped_config_loads():
    from pathlib import Path

    paths = sorted(Path("configs").rglob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        cfg = load_config(path)
        assert cfg.model.img_size_tuple() and cfg.objective.name, path


def test_every_config_key_of_every_objective_has_a_doc():
    import dataclasses

    from pretrain.config.explain import doc_of, missing_docs
    from pretrain.config.registry import objectives
    from pretrain.config.schema import SourceConfig

    required = {"finetune": ["objective.num_classes=2"]}  # sized from the labels; no default can be right
    for name in objectives():
        cfg = load_config(None, [f"objective.name={name}", *required.get(name, [])])
        assert missing_docs(cfg) == [], name
    assert [f.name for f in dataclasses.fields(SourceConfig) if not doc_of(SourceConfig, f.name)] == []


def test_config_explain_prints_every_key_with_type_value_and_doc(capsys):
    from pretrain.tools.cli.main import main

    assert main(["config", "explain", "configs/dino/demo.yaml", "optim.lr=0.002"]) == 0
    out = capsys.readouterr().out
    assert "  optim.lr: float = 0.002  (default 0.00015)  # " in out
    assert "objective.loss_weighting: Literal['dinov2', 'mean'] = 'dinov2'" in out
    keys = [line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  ")]
    assert len(keys) == len(set(keys)) and "model.kwargs" in keys and "kernels.attention" in keys


def test_choice_keys_fail_at_load_time_with_the_choices():
    with pytest.raises(ConfigError, match="kernels.attention' must be one of auto, torch"):
        load_config(None, ["kernels.attention=cudnn"])
    with pytest.raises(ConfigError, match="'optim.schedule' must be one of 'cosine', 'linear', 'constant'"):
        load_config(None, ["optim.schedule=step"])
    with pytest.raises(ConfigError, match="model.name"):
        load_config(None, ["model.name=resnet50"])
    with pytest.raises(ConfigError, match="unknown config key 'model.attn_backend'"):
        load_config(None, ["model.attn_backend=torch"])


@pytest.mark.parametrize("override, message", [
    ("optim.lr=.inf", r"'optim\.lr' must be a finite number, got inf"),
    ("optim.weight_decay=.nan", r"'optim\.weight_decay' must be a finite number"),
    ("objective.mask_ratio=-.inf", r"'objective\.mask_ratio' must be a finite number"),
    ("data.batch_size=-4", r"'data\.batch_size' must be >= 1, got -4"),
    ("data.num_workers=-1", r"'data\.num_workers' must be >= 0, got -1"),
    ("data.shuffle_buffer=-5", r"'data\.shuffle_buffer' must be >= 0"),
    ("optim.lr=-1e-3", r"'optim\.lr' must be >= 0"),
    ("optim.eps=0", r"'optim\.eps' must be > 0"),
    ("optim.betas=[0.9,1.0]", r"'optim\.betas' must be two numbers in \[0, 1\)"),
    ("objective.crop_scale=[-1,0]", r"'objective\.crop_scale' must satisfy 0 < low <= high <= 1, got \[-1\.0, 0\.0\]"),
    ("objective.crop_scale=[0.9,0.5]", r"'objective\.crop_scale' must satisfy"),
    ("data.train=[{shards: a, weight: -1}]", r"'data\.train\[0\]': weight must be >= 0"),
    ("data.train=[{shards: a, weight: 0}, {shards: b, weight: 0}]", r"'data\.train': the mixture weights sum to 0"),
])
def test_impossible_and_non_finite_values_are_errors_naming_the_key(override, message):
    """Accepted before, these trained to NaN weights and exited 0, or died in DeepSpeed or a crop."""
    with pytest.raises(ConfigError, match=message):
        load_config("configs/demo.yaml", [override])


def test_a_key_given_twice_in_a_yaml_file_is_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: not valid YAML: key 'lr' is given twice \(lines 2 and 3\)"):
        load_config(path)
    path.write_text("optim:\n  lr: 1.0e-3\ndata:\n  lr: 2.0e-3\n")  # one key per mapping: not a duplicate
    with pytest.raises(ConfigError, match=r"'data\.lr'"):  # (unknown there, but read)
        load_config(path)
