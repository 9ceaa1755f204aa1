"""Inputs around medical shard writing: the reports table, intensity presets, resampling.

Reports table (CSV with a header, or JSONL with one object per line). Each
row names what it describes with exactly one of

- ``series_uid``: a DICOM SeriesInstanceUID,
- ``study_uid``: a DICOM StudyInstanceUID (applies to every series of the study),
- ``path``: a file (or, for DICOM, the folder holding the series) relative to SRC,

and carries ``report`` (free text, stored as the sample's ``.txt``) and/or
``label`` (class name or integer index), and optionally ``patient`` (a patient
identifier for files that carry none, e.g. NIfTI; it is hashed, never stored).
A series row beats a study row, which beats a path row. UIDs are read from
this table only to match samples; they are never written out.
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

CT_WINDOWS = {  # (level, width) in HU
    "ct_lung": (-600.0, 1500.0),
    "ct_soft_tissue": (40.0, 400.0),
    "ct_bone": (400.0, 1800.0),
}
MRI_PERCENTILES = (0.5, 99.5)
PRESETS = tuple(CT_WINDOWS) + ("mri",)
_LOCATORS = ("series_uid", "study_uid", "path")
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class ReportRow:
    """One reports-table row after parsing; ``where`` is ``file:line`` for error messages."""

    where: str
    text: str | None
    label: int | None
    label_name: str | None
    patient: str | None


class ReportsTable:
    """Looks up the report row of a sample by series UID, study UID or relative path."""

    def __init__(self, rows: dict[tuple[str, str], ReportRow], classes: list[str] | None):
        self._rows = rows
        self.classes = classes

    def find(self, series_uid: str = "", study_uid: str = "", paths: Sequence[str] = ()) -> ReportRow | None:
        """The most specific row for a sample, or None."""
        candidates = [("series_uid", series_uid), ("study_uid", study_uid)] + [("path", p) for p in paths]
        for locator in candidates:
            if locator[1] and locator in self._rows:
                return self._rows[locator]
        return None


def read_reports(path: str | Path) -> ReportsTable:
    """Parse a reports CSV/JSONL file; raises ``ValueError`` naming the file and line."""
    path = Path(path)
    raw: list[tuple[int, dict[str, Any]]] = []
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    obj = json.loads(line)
                    if not isinstance(obj, dict):
                        raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
                    raw.append((n, obj))
        else:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                raw = [(reader.line_num, {k.strip().lower(): v for k, v in row.items() if k}) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: reports table is not readable: {e}") from e

    parsed: dict[tuple[str, str], tuple[str, str | None, str, str | None]] = {}
    for line, row in raw:
        where = f"{path}:{line}"
        cells = {k: ("" if v is None else str(v).strip()) for k, v in row.items()}
        given = [name for name in _LOCATORS if cells.get(name)]
        if len(given) != 1:
            raise ValueError(f"{where}: give exactly one of {', '.join(_LOCATORS)} (found {given or 'none'})")
        value = cells[given[0]]
        if given[0] == "path":
            value = _relative_path(value, where)
        if not cells.get("report") and not cells.get("label"):
            raise ValueError(f"{where}: row has neither 'report' nor 'label'")
        locator = (given[0], value)
        if locator in parsed:
            raise ValueError(f"{where}: {given[0]} listed twice (first at {parsed[locator][0]})")
        parsed[locator] = (where, cells.get("report") or None, cells.get("label", ""), cells.get("patient") or None)

    names = {label for _, _, label, _ in parsed.values() if label}
    if not names:
        classes, index = None, {}
    elif all(_INTEGER.fullmatch(n) for n in names):
        index = {n: int(n) for n in names}
        if min(index.values()) < 0:
            raise ValueError(f"{path}: integer labels must be class indices >= 0")
        classes = [str(i) for i in range(max(index.values()) + 1)]
    else:
        classes = sorted(names)
        index = {n: i for i, n in enumerate(classes)}
    rows = {
        locator: ReportRow(
            where, text, index[label] if label else None, classes[index[label]] if label else None, patient
        )
        for locator, (where, text, label, patient) in parsed.items()
    }
    return ReportsTable(rows, classes)


def _relative_path(value: str, where: str) -> str:
    path = PurePosixPath(value.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{where}: path {value!r} must be relative to the source folder, without '..'")
    return path.as_posix().rstrip("/")


def apply_preset(image: np.ndarray, meta: dict[str, Any], preset: str | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Map intensities with a preset and record it under ``meta["intensity"]``.

    CT windows clip HU to ``[level - width/2, level + width/2]`` and store uint8
    0..255 over the window (only for CT or unknown modality). ``mri`` clips each
    channel to its 0.5/99.5 percentiles and stores float32 in [0, 1] (only for MR
    or unknown modality). Other modalities pass unchanged with ``intensity`` None.
    """
    if preset is None:
        return image, dict(meta, intensity=None)
    if preset not in PRESETS:
        raise ValueError(f"unknown intensity preset {preset!r}; choose one of {', '.join(PRESETS)}")
    modality = meta.get("modality")
    if preset in CT_WINDOWS:
        if modality not in (None, "CT"):
            return image, dict(meta, intensity=None)
        level, width = CT_WINDOWS[preset]
        lo, hi = level - width / 2, level + width / 2
        scaled = (np.clip(image.astype(np.float32), lo, hi) - lo) * (255.0 / (hi - lo))
        intensity = {"preset": preset, "window_hu": [lo, hi], "stored": "uint8"}
        return np.round(scaled).astype(np.uint8), dict(meta, intensity=intensity)
    if modality not in (None, "MR"):
        return image, dict(meta, intensity=None)
    out = np.empty(image.shape, np.float32)
    for c in range(image.shape[0]):
        lo, hi = np.percentile(image[c], MRI_PERCENTILES)
        span = hi - lo if hi > lo else 1.0
        out[c] = (np.clip(image[c].astype(np.float32), lo, hi) - lo) / span
    return out, dict(meta, intensity={"preset": "mri", "percentiles": list(MRI_PERCENTILES), "stored": "float32"})


def resample(
    image: np.ndarray, meta: dict[str, Any], target_spacing: Sequence[float] | None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Resample to ``target_spacing`` (``[d, h, w]`` mm; 2D images use ``[h, w]``), (bi/tri)linear.

    Integer data is rounded back to its dtype. Raises ``ValueError`` when the
    sample has no spacing. Records the original spacing in ``resampled_from_spacing``.
    """
    import torch
    import torch.nn.functional as F

    if target_spacing is None:
        return image, dict(meta, resampled_from_spacing=None)
    spacing = meta.get("spacing")
    if spacing is None:
        raise ValueError("sample has no voxel spacing; cannot resample it to a target spacing")
    target = [float(t) for t in target_spacing][-len(spacing):]
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(image.shape[1:], spacing, target)]
    if size == list(image.shape[1:]) and all(math.isclose(s, t) for s, t in zip(spacing, target)):
        return image, dict(meta, resampled_from_spacing=None)
    mode = "trilinear" if len(size) == 3 else "bilinear"
    x = torch.from_numpy(image.astype(np.float32))[None]
    y = F.interpolate(x, size=size, mode=mode, align_corners=False)[0].numpy()
    if image.dtype.kind in "iu":
        info = np.iinfo(image.dtype)
        y = np.clip(np.round(y), info.min, info.max).astype(image.dtype)
    else:
        y = y.astype(image.dtype)
    return y, dict(meta, spacing=target, resampled_from_spacing=list(spacing))
