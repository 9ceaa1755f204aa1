"""Errors a user can cause end in one line and the exit code of their kind (issue 17: a run directory that is a
file, a resume with another batch size, a batch that cannot fit in memory); --debug shows the traceback."""
from __future__ import annotations

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.engine.preflight import check_batch_memory
from pretrain.tools.cli.main import EXIT_ENVIRONMENT, EXIT_USAGE, main
from tests.faults.conftest import config_yaml, run_config, write_shard


@pytest.fixture
def config(tmp_path):
    return config_yaml(tmp_path, run_config(tmp_path, write_shard(tmp_path / "shards" / "s.tar", 64, {}).parent,
                                            train={"steps": 2}))


def test_a_run_directory_that_is_a_file_is_an_environment_error(tmp_path, config, single_process, capsys):
    (tmp_path / "afile").write_text("notes")
    assert main(["train", config, f"train.run_dir={tmp_path / 'afile'}"]) == EXIT_ENVIRONMENT
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("pretrain:")]
    assert "environment error" in line and "afile" in line and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "notes"


def test_resuming_with_another_batch_size_is_a_config_error_and_changes_nothing(tmp_path, config, single_process,
                                                                               capsys):
    assert main(["train", config]) == 0
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    capsys.readouterr()
    assert main(["train", config, "train.steps=4", "data.batch_size=4"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "saved with batch_size=8, this run has batch_size=4" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == checkpoints


def test_debug_shows_the_traceback(tmp_path, config, single_process):
    (tmp_path / "afile").write_text("")
    with pytest.raises(OSError):
        main(["--debug", "train", config, f"train.run_dir={tmp_path / 'afile'}"])


def test_a_batch_that_cannot_fit_in_memory_is_refused_naming_the_key():
    cfg = load_config(None, ["model.img_size=224", "data.batch_size=4096", "data.num_workers=4"])
    with pytest.raises(ConfigError, match=r"'data.batch_size': 4096 samples per batch need at least 6\.9 GiB"):
        check_batch_memory(cfg, available=8 * 2**30)
    check_batch_memory(cfg, available=64 * 2**30)  # 9 batches of 4096 x 224^2 floats: 6.9 GiB of 64
