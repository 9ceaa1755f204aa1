"""Fixtures of the fault-injection tests; the planted faults themselves are the fault benchmark's
(:mod:`pretrain.tools.bench.fault_cases`), so the tests and the reliability report inject the same ones."""
from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.engine.distributed import free_port
from pretrain.tools.bench.fault_cases import BAD_SAMPLES, ODD_SAMPLES, SIZE, tiny_run, write_config, write_shard

__all__ = ["BAD_SAMPLES", "ODD_SAMPLES", "SIZE", "write_shard", "run_config", "config_yaml"]


def run_config(tmp_path: Path, shards: Path, **sections) -> dict:
    """The tiny MAE run on ``shards`` in ``tmp_path/run``, with ``sections`` updating its sections."""
    cfg = tiny_run(shards, tmp_path / "run")
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


def config_yaml(tmp_path: Path, cfg: dict) -> str:
    return write_config(tmp_path / "config.yaml", cfg)


@pytest.fixture
def single_process(monkeypatch):
    """A lone rank on a fresh port, as `pretrain train` without a launcher."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
