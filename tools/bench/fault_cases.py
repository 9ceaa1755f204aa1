"""What the fault benchmark and the fault tests plant: bad shard samples, and a tiny run over them.

Each bad sample is written as raw tar members (not through ``encode_sample``, which refuses most of them):
what another tool, a bug or a damaged disk could leave in a shard.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import webdataset as wds
import yaml

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
    "one_inf_pixel": (lambda: {"npy": npy(np.where(np.eye(SIZE, dtype=bool)[None], np.inf, 1.0))}, "non_finite"),
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
    "int64_extremes": lambda: {"npy": npy(np.array([[[np.iinfo(np.int64).min, np.iinfo(np.int64).max] * (SIZE // 2)]
                                                     * SIZE]))},
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


def tiny_run(shards: Path, run_dir: Path, **sections: dict) -> dict:
    """A MAE run that trains in well under a second per step on one core, over ``shards``, one loader worker,
    for 6 steps; ``sections`` update its sections (``train={"steps": 12}``)."""
    cfg = {
        "model": {"preset": "nano", "spatial_dims": 2, "img_size": SIZE, "patch_size": 8, "in_chans": 1,
                  "pos_embed": "sincos"},
        "objective": {"name": "mae", "mask_ratio": 0.75, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2,
                      "norm_pix_loss": True},
        "data": {"train": str(shards), "batch_size": 8, "num_workers": 1, "shuffle_buffer": 16},
        "optim": {"lr": 3.0e-3, "min_lr": 1.0e-4, "warmup_steps": 2, "weight_decay": 0.05, "grad_clip": 1.0},
        "train": {"steps": 6, "seed": 0, "precision": "fp32", "zero_stage": 0, "log_every": 1,
                  "ckpt_every": 1000, "progress": False, "export_on_end": False, "threads": 1,
                  "run_dir": str(run_dir)},
        "eval": {"knn_train": None, "knn_val": None, "at_start": False},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


def write_config(path: Path, cfg: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)
