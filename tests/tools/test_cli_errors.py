"""Mistakes a new user makes end in one line naming the key or sample, a distinct exit code, and nothing written."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretrain.tools.cli.main import EXIT_DATA, EXIT_USAGE, main
from pretrain.tools.ingest.images import write_shards

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("png")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32), np.uint8)).save(src / f"{i}.png")
    out = src.parent / "unlabelled_shards"
    write_shards(src, out, progress=False)
    return out


@pytest.mark.parametrize("command", ["knn", "probe"])
def test_eval_on_unlabelled_shards_is_a_data_error(unlabelled: Path, command: str, capsys):
    code = main(["eval", command, "--random-init", DEMO, "--train", str(unlabelled), "--val", str(unlabelled)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_DATA and err.count("\n") == 0, err
    assert err.startswith("pretrain: data error:") and "has no label" in err and str(unlabelled) in err


@pytest.mark.parametrize("override, key", [
    ("data.train={missing}", "'data.train'"),
    ("eval.knn_train={missing}", "'eval.knn_train'"),
    ("eval.knn_val=", "'eval.knn_val' is empty while 'eval.knn_train' is set"),
])
def test_a_shard_set_that_does_not_resolve_is_refused_before_the_run_directory_exists(
        unlabelled: Path, tmp_path: Path, override: str, key: str, capsys):
    run_dir = tmp_path / "run"
    missing = tmp_path / "no_such_shards"
    code = main(["train", DEMO, f"data.train={unlabelled}", f"eval.knn_train={unlabelled}", f"eval.knn_val={unlabelled}",
                 override.format(missing=missing), f"train.run_dir={run_dir}", "train.steps=1", "--no-export"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USAGE and f"config key {key}" in err and "Traceback" not in err, err
    assert not run_dir.exists()
