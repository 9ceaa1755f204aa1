"""The files an export folder holds, and where its ``medpretrain`` entry is (our own record of the model)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
OPEN_CLIP_CONFIG = "open_clip_config.json"
# timm / MONAI exports keep the entry in config.json; open_clip exports in open_clip_config.json (their
# config.json is the text transformer's, for transformers)
META_FILES = (OPEN_CLIP_CONFIG, CONFIG)


def export_meta(folder: str | Path) -> dict[str, Any]:
    """The ``medpretrain`` entry of an export folder; ValueError naming the file when there is none."""
    folder = Path(folder)
    for name in META_FILES:
        path = folder / name
        if path.is_file():
            try:
                return json.loads(path.read_text())["medpretrain"]
            except (ValueError, KeyError, TypeError):
                if name == CONFIG:
                    raise ValueError(f"{path}: not a medpretrain export config (no 'medpretrain' entry)") from None
    raise ValueError(f"{folder}: not an export folder (no {' or '.join(META_FILES)}); make one with `pretrain export`")


def is_export(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in META_FILES)
