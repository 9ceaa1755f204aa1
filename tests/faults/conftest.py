"""Helpers of the fault-injection tests (``single_process`` is the suite's, in tests/conftest.py). The planted
faults are the fault benchmark's (:mod:`pretrain.tools.bench.fault_cases`): the tests and the reliability
report inject the same ones."""
from __future__ import annotations

from pathlib import Path

from pretrain.tools.bench.fault_cases import BAD_SAMPLES, ODD_SAMPLES, SIZE, tiny_run, write_config, write_shard

__all__ = ["BAD_SAMPLES", "ODD_SAMPLES", "SIZE", "write_shard", "run_config", "config_yaml"]


def run_config(tmp_path: Path, shards: Path, **sections) -> dict:
    """The tiny MAE run on ``shards`` in ``tmp_path/run``, with ``sections`` updating its sections."""
    return tiny_run(shards, tmp_path / "run", **sections)


def config_yaml(tmp_path: Path, cfg: dict) -> str:
    return write_config(tmp_path / "config.yaml", cfg)

