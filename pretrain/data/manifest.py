"""``manifest.json``: what a shard folder holds, and checks that it still does.

Written last by ``pretrain shards write`` (``tools/ingest``; so a folder with a
manifest is complete), read by the data stream to find shards and by users to
see what went in:

    {
      "format": "medpretrain-shards/1",
      "num_samples": 1200, "num_failed": 3,
      "failed": [{"path": "ct/broken.npy", "reason": "..."}],
      "shards": [{"name": "shard-000000.tar", "samples": 1000, "bytes": ..., "sha256": "..."}],
      "spatial_dims": [2, 3], "channels": [1, 3],
      "dtypes": {"uint8": 700, "int16": 500},
      "shape_min": {"2": [H, W], "3": [D, H, W]}, "shape_max": {...},
      "classes": ["benign", "malignant"] | null,
      "source": "/data/raw"
    }

``shape_min``/``shape_max`` are element-wise over the spatial shape (channels
are listed separately), grouped by the number of spatial dims.

While a conversion is unfinished, ``journal.jsonl`` (in the output folder, the
parent of its ``train``/``val``/``test`` folders) records its progress and the
shard being written is a ``.tar.tmp``; ``unfinished_conversion`` tells training so.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "medpretrain-shards/1"
MANIFEST_NAME = "manifest.json"
JOURNAL_NAME = "journal.jsonl"  # a conversion's progress: see tools/ingest/journal.py
_SPLIT_FOLDERS = ("train", "val", "test")  # a split conversion keeps its journal one level up
_REQUIRED_KEYS = (
    "format",
    "num_samples",
    "num_failed",
    "failed",
    "shards",
    "spatial_dims",
    "channels",
    "dtypes",
    "shape_min",
    "shape_max",
    "classes",
    "source",
)
_SHARD_KEYS = {"name": str, "samples": int, "bytes": int, "sha256": str}
_HASH_CHUNK_BYTES = 4 * 2**20


class ManifestError(ValueError):
    """A manifest is missing keys, malformed or of another format; the message names the file."""


@dataclass
class ManifestBuilder:
    """Accumulates a manifest while shards are written."""

    source: str
    classes: list[str] | None = None
    conversion: dict[str, Any] | None = None  # choices that shaped the samples (orientation, 4-D handling, ...)
    num_samples: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    shards: list[dict[str, Any]] = field(default_factory=list)
    dtypes: dict[str, int] = field(default_factory=dict)
    channels: set[int] = field(default_factory=set)
    shape_min: dict[str, list[int]] = field(default_factory=dict)
    shape_max: dict[str, list[int]] = field(default_factory=dict)

    def add_sample(self, image_shape: tuple[int, ...], dtype: str) -> None:
        """Count one converted image of channels-first shape ``image_shape``."""
        self.num_samples += 1
        self.dtypes[dtype] = self.dtypes.get(dtype, 0) + 1
        self.channels.add(int(image_shape[0]))
        spatial = [int(s) for s in image_shape[1:]]
        group = str(len(spatial))
        lo, hi = self.shape_min.get(group), self.shape_max.get(group)
        self.shape_min[group] = spatial if lo is None else [min(a, b) for a, b in zip(lo, spatial)]
        self.shape_max[group] = spatial if hi is None else [max(a, b) for a, b in zip(hi, spatial)]

    def add_failure(self, path: str, reason: str) -> None:
        """Record a source file that could not be converted."""
        self.failed.append({"path": path, "reason": reason})

    def add_shard(self, name: str, samples: int, nbytes: int, sha256: str) -> None:
        """Record one completed shard file."""
        self.shards.append({"name": name, "samples": samples, "bytes": nbytes, "sha256": sha256})

    def to_dict(self) -> dict[str, Any]:
        """The manifest as a JSON-ready dict."""
        return {
            "format": FORMAT,
            "num_samples": self.num_samples,
            "num_failed": len(self.failed),
            "failed": list(self.failed),
            "shards": list(self.shards),
            "spatial_dims": sorted(int(g) for g in self.shape_min),
            "channels": sorted(self.channels),
            "dtypes": dict(sorted(self.dtypes.items())),
            "shape_min": dict(sorted(self.shape_min.items())),
            "shape_max": dict(sorted(self.shape_max.items())),
            "classes": None if self.classes is None else list(self.classes),
            "source": self.source,
            **({"conversion": dict(self.conversion)} if self.conversion else {}),
        }


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Validate ``manifest`` and write it to ``out_dir/manifest.json`` atomically.

    Written to a temporary name and renamed, so a reader never sees half a file.
    Returns the manifest's path.
    """
    path = Path(out_dir) / MANIFEST_NAME
    _validate(manifest, where=str(path))
    tmp = path.with_name(MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """Load and validate ``shard_dir/manifest.json``.

    Raises ``FileNotFoundError`` if there is none and ``ManifestError`` if it is
    not valid JSON, lacks keys or is of another format.
    """
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no manifest; is {shard_dir} a shard folder written by `pretrain shards write`?"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON: {e}") from e
    _validate(manifest, where=str(path))
    return manifest


def shard_paths(shard_dir: str | Path) -> list[Path]:
    """Paths of the shards listed in ``shard_dir``'s manifest, in manifest order."""
    return [Path(shard_dir) / shard["name"] for shard in read_manifest(shard_dir)["shards"]]


def unfinished_conversion(shard_dir: str | Path) -> str | None:
    """Why ``shard_dir`` is a conversion that has not finished (or is still running), or None.

    Unfinished: a ``*.tar.tmp`` (a shard being written), or a journal (in the
    folder, or one up for a split folder) but no manifest. A folder of plain
    shards no writer of ours made (no journal, no ``.tmp``) is not flagged.
    """
    folder = Path(shard_dir)
    partial = sorted(p.name for p in folder.glob("*.tar.tmp"))
    if partial:
        return f"it holds the partly written shard {partial[0]}"
    journals = [folder / JOURNAL_NAME] + ([folder.parent / JOURNAL_NAME] if folder.name in _SPLIT_FOLDERS else [])
    journal = next((j for j in journals if j.exists()), None)
    if journal is not None and not (folder / MANIFEST_NAME).exists():
        return f"{journal} records a conversion that has not written {MANIFEST_NAME} yet"
    return None


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_shards(shard_dir: str | Path) -> list[str]:
    """Names of the manifest's shards that are missing or whose size or sha256 differ.

    An empty list means every shard is intact.
    """
    shard_dir = Path(shard_dir)
    bad = []
    for shard in read_manifest(shard_dir)["shards"]:
        path = shard_dir / shard["name"]
        # Size first: a cheap stat catches truncation without hashing gigabytes.
        if not path.is_file() or path.stat().st_size != shard["bytes"] or file_sha256(path) != shard["sha256"]:
            bad.append(shard["name"])
    return bad


def _validate(manifest: Any, where: str) -> None:
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: manifest must be a JSON object, got {type(manifest).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ManifestError(f"{where}: manifest lacks key(s) {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        raise ManifestError(f"{where}: format {manifest['format']!r} is not {FORMAT!r}")
    if not isinstance(manifest["shards"], list):
        raise ManifestError(f"{where}: 'shards' must be a list")
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict):
            raise ManifestError(f"{where}: shards[{i}] must be an object")
        for key, kind in _SHARD_KEYS.items():
            if not isinstance(shard.get(key), kind):
                raise ManifestError(f"{where}: shards[{i}] needs {key!r} of type {kind.__name__}")
        name = shard["name"]
        if Path(name).name != name or name in ("", ".", ".."):
            raise ManifestError(f"{where}: shards[{i}] name {name!r} must be a plain file name")
    counted = sum(shard["samples"] for shard in manifest["shards"])
    if counted != manifest["num_samples"]:
        raise ManifestError(f"{where}: num_samples is {manifest['num_samples']} but the shards hold {counted}")
    if not isinstance(manifest["failed"], list) or len(manifest["failed"]) != manifest["num_failed"]:
        raise ManifestError(f"{where}: num_failed does not match the length of 'failed'")
