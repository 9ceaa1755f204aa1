"""Every sample-level fault costs that sample only: rejected with its key and reason, counted, and a run
with too many stops with a diagnosis (issue 17: zero-length axes, bad JSON, 0-d arrays, NaN/inf, complex)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from pretrain.config import load_config
from pretrain.data.stream import ShardStream, StreamSource
from pretrain.data.transforms import to_tensor
from pretrain.objectives import build_objective
from pretrain.objectives.base import BuildContext
from pretrain.tools.cli.main import EXIT_DATA, main
from tests.faults.conftest import BAD_SAMPLES, ODD_SAMPLES, config_yaml, run_config, write_shard


def mae_stream(shard, batch_size=8, **kw) -> ShardStream:
    """The stream `pretrain train` builds for the tiny MAE config: its real transform and collate."""
    cfg = load_config(None, ["model.preset=nano", "model.img_size=32", "model.patch_size=8", "objective.name=mae",
                             "objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2"])
    recipe = build_objective(cfg, BuildContext()).data_recipe()
    return ShardStream([StreamSource([str(shard)])], batch_size=batch_size, transform=recipe.transform,
                       collate=recipe.collate, shuffle_buffer=0, **kw)


def test_each_bad_sample_is_rejected_with_its_key_and_reason_and_costs_no_batch(tmp_path, caplog):
    names = sorted(BAD_SAMPLES)
    planted = {3 + 5 * i: BAD_SAMPLES[name][0]() for i, name in enumerate(names)}
    shard = write_shard(tmp_path / "bad.tar", 120, planted)
    with caplog.at_level(logging.WARNING, logger="pretrain.data.stream"):
        batches = [b for _, b in zip(range(12), mae_stream(shard))]
    stats = batches[-1]["_stream"]
    expected: dict[str, int] = {}
    for name in names:
        expected[BAD_SAMPLES[name][1]] = expected.get(BAD_SAMPLES[name][1], 0) + 1
    assert stats["bad_by_reason"] == expected and stats["bad_samples"] == len(names)
    for batch in batches:  # every batch full, finite, and of good samples only
        assert batch["image"].shape == (8, 1, 32, 32) and torch.isfinite(batch["image"]).all()
    logged = caplog.text
    for i, name in zip(planted, names):
        assert f"bad{i:05d}" in logged and f"({BAD_SAMPLES[name][1]}," in logged, name


@pytest.mark.parametrize("name", sorted(ODD_SAMPLES))
def test_odd_but_trainable_samples_reach_a_batch_finite(tmp_path, name):
    shard = write_shard(tmp_path / "odd.tar", 8, {0: ODD_SAMPLES[name]()})
    (batch,) = [b for _, b in zip(range(1), mae_stream(shard))]
    assert batch["_stream"]["bad_samples"] == 0
    assert torch.isfinite(batch["image"]).all()


def test_a_one_pixel_image_normalises_to_zeros_not_nan():
    # torch's std of one value is NaN (n - 1 = 0): it turned a 1x1 image, and with it its batch's loss, NaN
    assert torch.equal(to_tensor(np.full((1, 1, 1), 7, np.uint16)), torch.zeros(1, 1, 1))


def test_a_run_with_a_few_bad_samples_trains_every_step(tmp_path, single_process):
    planted = {2 + 3 * i: spec() for i, (spec, _) in enumerate(BAD_SAMPLES.values())}
    shard = write_shard(tmp_path / "shards" / "bad.tar", 256, planted)
    cfg = run_config(tmp_path, shard.parent, data={"max_bad_fraction": 0.5})
    assert main(["train", config_yaml(tmp_path, cfg)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_nonfinite"] == 0 and summary["steps"] == 6
    assert sum(summary["bad_samples"].values()) >= 10 and {"non_finite", "metadata", "dtype"} <= set(summary["bad_samples"])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["data/bad_samples"] == sum(summary["bad_samples"].values())
    assert 0.1 < logged[-1]["data/bad_fraction"] < 0.5


def test_too_many_bad_samples_stop_the_run_with_a_diagnosis(tmp_path, single_process, capsys):
    planted = {i: BAD_SAMPLES["nan_image"][0]() for i in range(0, 256, 4)}  # a quarter NaN
    shard = write_shard(tmp_path / "shards" / "bad.tar", 256, planted)
    cfg = run_config(tmp_path, shard.parent)
    assert main(["train", config_yaml(tmp_path, cfg)]) == EXIT_DATA
    err = capsys.readouterr().err
    assert "max_bad_fraction=0.05" in err and "'non_finite'" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "summary.json").exists()  # not a finished run


def test_all_nan_data_stop_the_run_instead_of_skipping_every_step(tmp_path, single_process, capsys):
    shard = write_shard(tmp_path / "shards" / "nan.tar", 300, {i: BAD_SAMPLES["nan_image"][0]() for i in range(300)})
    cfg = run_config(tmp_path, shard.parent)
    assert main(["train", config_yaml(tmp_path, cfg)]) == EXIT_DATA
    err = capsys.readouterr().err
    assert "1000 samples in a row were rejected" in err and "NaN or inf" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
