"""Shards with planted faults, and a tiny training config over them, for the fault-injection tests.

Each bad sample is written as raw tar members (not through ``encode_sample``, which refuses most of them):
what another tool, a bug or a damaged disk could leave in a shard.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import webdataset as wds
import yaml

from pretrain.engine.distributed import free_port
from tests.engine.conftest import tiny_config

SIZE = 32


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def good_members(i: int, rng: np.random.Generator) -> dict:
    image = (rng.random((1, SIZE, SIZE)) * 1000).astype(np.uint16)
    return {"__key__": f"good{i:05d}", "npy": npy(image), "json": json.dumps({"label": None}).encode()}


# name -> (members replacing a good sample's, the reason the stream must give)
BAD_SAMPLES: dict[str, tuple[Callable[[], dict], str]] = {
    "zero_length_axis": (lambda: {"npy": npy(np.zeros((1, 0, SIZE), np.uint16))}, "empty_axis"),
    "json_null": (lambda: {"json": b"null"}, "metadata"),
    "json_list": (lambda: {"json": b"[]"}, "metadata"),
    "json_number": (lambda: {"json": b"1"}, "metadata"),
    "json_string": (lambda: {"json": b'"x"'}, "metadata"),
    "json_garbage": (lambda: {"json": b"{not json"}, "decode"),
    "zero_d_array": (lambda: {"npy": npy(np.array(3.0))}, "shape"),
    "one_d_array": (lambda: {"npy": npy(np.ones(SIZE, np.uint16))}, "shape"),
    "nan_image": (lambda: {"npy": npy(np.full((1, SIZE, SIZE), np.nan, np.float32))}, "non_finite"),
    "one_inf_pixel": (lambda: {"npy": npy(np.where(np.eye(SIZE, dtype=bool)[None], np.inf, 1.0).astype(np.float64))},
                      "non_finite"),
    "complex_image": (lambda: {"npy": npy(np.ones((1, SIZE, SIZE), np.complex64))}, "dtype"),
    "string_array": (lambda: {"npy": npy(np.array([["a"] * SIZE] * SIZE)[None])}, "dtype"),
    "garbage_npy": (lambda: {"npy": b"\x93NUMPY garbage"}, "decode"),
    "no_image_member": (lambda: {"npy": None}, "decode"),
    "volume_for_2d_model": (lambda: {"npy": npy(np.ones((1, 4, SIZE, SIZE), np.uint16))}, "transform"),
    "mask_off_grid": (lambda: {"seg.npy": npy(np.zeros((1, 3, 3), np.uint8))}, "mask"),
}
# Odd but trainable: each must reach a batch, finite.
ODD_SAMPLES: dict[str, Callable[[], dict]] = {
    "seven_channels": lambda: {"npy": npy(np.ones((7, SIZE, SIZE), np.uint16))},  # averaged to the model's one
    "float64_beyond_float32": lambda: {"npy": npy(np.linspace(-1e300, 1e300, SIZE * SIZE).reshape(1, SIZE, SIZE))},
    "one_pixel": lambda: {"npy": npy(np.ones((1, 1, 1), np.uint16))},
    "constant": lambda: {"npy": npy(np.zeros((1, SIZE, SIZE), np.uint16))},
    "bool_image": lambda: {"npy": npy(np.eye(SIZE, dtype=bool)[None])},
    "float16_huge": lambda: {"npy": npy(np.full((1, SIZE, SIZE), 6e4, np.float16))},
    "int64_extremes": lambda: {"npy": npy(np.array([[[np.iinfo(np.int64).min, np.iinfo(np.int64).max] * (SIZE // 2)] * SIZE]))},
}


def write_shard(path: Path, n_good: int, planted: dict[int, dict], seed: int = 0) -> Path:
    """``n_good`` good samples with the members of ``planted[i]`` replacing those of sample ``i`` (a member
    set to None is left out); planted samples keep their own key ``bad<i>``."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as writer:
        for i in range(n_good):
            members = good_members(i, rng)
            if i in planted:
                members.update(planted[i], __key__=f"bad{i:05d}")
                members = {k: v for k, v in members.items() if v is not None}
            writer.write(members)
    return path


def run_config(tmp_path: Path, shards: Path, **sections) -> dict:
    """The engine tests' tiny MAE config on ``shards``, one loader worker, in ``tmp_path/run``."""
    cfg = tiny_config(tmp_path)
    cfg["data"].update(train=str(shards), num_workers=1, shuffle_buffer=16)
    cfg["train"].update(run_dir=str(tmp_path / "run"), steps=6)
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


def config_yaml(tmp_path: Path, cfg: dict) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


@pytest.fixture
def single_process(monkeypatch):
    """A lone rank on a fresh port, as `pretrain train` without a launcher."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
