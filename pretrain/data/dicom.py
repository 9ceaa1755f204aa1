"""DICOM files to channels-first arrays: series grouping, slice ordering, rescale.

- Files are recognised by content (128-byte preamble + ``DICM``), or by a
  forced parse for files written without the preamble.
- Single-frame files group into series by SeriesInstanceUID. Slices are ordered
  by their position along the slice normal (``ImagePositionPatient`` projected
  on ``row x col`` of ``ImageOrientationPatient``), never by file name or
  InstanceNumber.
- A series whose slices have mixed orientations, differing sizes or pixel
  spacings, duplicated positions, missing slices (a gap that is a multiple of
  the usual step) or otherwise uneven steps raises ``SeriesError``.
- Multi-frame files are one volume each, frames ordered the same way from the
  per-frame functional groups (or kept in stored order when they lack positions).
- RescaleSlope/Intercept are applied: the result is int16 when slope and
  intercept are integers and every value fits int16 (CT in HU), float32 otherwise; data
  without rescale keeps its stored dtype.
- MONOCHROME1 (radiographs where larger means darker) is inverted to MONOCHROME2.

Arrays are ``(C, H, W)`` for one image and ``(C, D, H, W)`` for a volume.
A volume with known geometry is stored in RAS canonical orientation
(``pretrain.data.orientation``: D towards superior, H anterior, W right,
``orientation`` ``"SAR"``), with ``original_orientation`` the code of the
acquisition order (D along the slice normal, H along the column direction,
W along the row direction: e.g. ``"SPL"`` for an axial stack). ``spacing`` is
in mm in the stored axis order. A single image keeps its stored layout; its
``orientation`` names the patient direction its rows and columns point towards.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pretrain.data.orientation import CANONICAL, lps_to_ras, ras_code, to_canonical

_PREAMBLE = 128
_ORIENTATION_TOLERANCE = 1e-3  # direction cosines written with few digits still match
_STEP_TOLERANCE = 0.02  # relative deviation of a slice step from the median step


class SeriesError(ValueError):
    """A DICOM series or file cannot become one volume; the message names the reason."""


@dataclass(frozen=True)
class DicomHeader:
    """What grouping needs from one file, read without its pixel data (UIDs stay in memory only)."""

    path: str
    series_uid: str
    study_uid: str
    patient_id: str
    frames: int


def has_dicom_preamble(path: str | Path) -> bool:
    """True when the file carries the 128-byte preamble followed by ``DICM``."""
    try:
        with open(path, "rb") as f:
            head = f.read(_PREAMBLE + 4)
    except OSError:
        return False
    return len(head) == _PREAMBLE + 4 and head[_PREAMBLE:] == b"DICM"


def read_dicom_header(path: str | Path) -> DicomHeader | None:
    """Header of a DICOM image file, or None when ``path`` is not DICOM image data.

    Files without a preamble are parsed with ``force=True`` and accepted only
    when they carry the attributes of an image (SOP class, rows, columns).
    """
    import pydicom

    preamble = has_dicom_preamble(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=not preamble)
    except Exception:  # pydicom raises InvalidDicomError, EOFError, struct.error, ... on foreign bytes
        return None
    if "Rows" not in ds or "Columns" not in ds or not (preamble or "SOPClassUID" in ds):
        return None
    series = str(ds.get("SeriesInstanceUID", "") or "")
    study = str(ds.get("StudyInstanceUID", "") or "")
    patient = str(ds.get("PatientID", "") or "")
    return DicomHeader(str(path), series, study, patient, int(ds.get("NumberOfFrames", 1) or 1))


def group_series(headers: Sequence[DicomHeader]) -> dict[str, list[DicomHeader]]:
    """Headers grouped into volumes: single-frame files by series UID, each multi-frame file on its own.

    Keys are the series UID, or ``"<series UID>/<path>"`` for multi-frame files
    and files without a series UID (each of those is a volume by itself).
    """
    groups: dict[str, list[DicomHeader]] = {}
    for header in headers:
        if header.frames > 1 or not header.series_uid:
            key = f"{header.series_uid}/{header.path}"
        else:
            key = header.series_uid
        groups.setdefault(key, []).append(header)
    return groups


def orientation_code(directions_3x3: np.ndarray) -> str:
    """The letters each axis (a row of ``directions_3x3``, in DICOM's LPS coordinates) points towards, e.g.
    ``"SPL"``: the same code the stored volumes' ``orientation`` uses."""
    return ras_code(lps_to_ras(directions_3x3))


def load_dicom_series(paths: Sequence[str | Path]) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one series (one multi-frame file, or one or more single-frame files).

    Returns ``(image, meta)`` with ``meta`` holding only non-identifying keys:
    ``kind, modality, body_part, spatial_dims, channels, spacing, orientation,
    rescale_applied, photometric_inverted``. Raises ``SeriesError``.
    """
    import pydicom

    if not paths:
        raise SeriesError("empty series")
    datasets = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path, force=True))
        except Exception as e:
            raise SeriesError(f"{path}: not readable DICOM: {e}") from e
    if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) > 1:
        return _load_multiframe(datasets[0], str(paths[0]))
    if len(datasets) == 1:
        return _load_single_image(datasets[0], str(paths[0]))
    for ds, path in zip(datasets, paths):
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise SeriesError(f"{path}: multi-frame file inside a multi-file series")
    return _load_stack(datasets, [str(p) for p in paths])


def _pixels(ds: Any, path: str) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as e:  # missing decoder plugins, truncated pixel data, ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise SeriesError(f"{path}: pixel data not decodable (transfer syntax {syntax}): {e}") from e


def _rescale(ds: Any) -> tuple[float, float] | None:
    """``(slope, intercept)`` from the top level or the shared functional groups, or None."""
    source = ds
    if "RescaleSlope" not in ds and "SharedFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0]
        if "PixelValueTransformationSequence" in shared:
            source = shared.PixelValueTransformationSequence[0]
    if "RescaleSlope" not in source and "RescaleIntercept" not in source:
        return None
    return float(source.get("RescaleSlope", 1.0) or 1.0), float(source.get("RescaleIntercept", 0.0) or 0.0)


def apply_rescale(raw: np.ndarray, rescales: Sequence[tuple[float, float] | None]) -> tuple[np.ndarray, bool]:
    """Stored values to modality values, one ``(slope, intercept)`` (or None) per entry of ``raw``'s first axis.

    int16 when every slope and intercept is an integer and the result fits
    (exact: CT in HU), float32 otherwise; ``raw`` unchanged when all are None.
    Works slice by slice so a large volume never exists in float64.
    """
    if all(r is None for r in rescales):
        return raw, False
    pairs = [r if r is not None else (1.0, 0.0) for r in rescales]
    info = np.iinfo(np.int16)
    exact = all(float(s).is_integer() and float(b).is_integer() for s, b in pairs)
    for plane, (slope, intercept) in zip(raw, pairs):
        ends = (float(plane.min()) * slope + intercept, float(plane.max()) * slope + intercept)
        exact = exact and info.min <= min(ends) and max(ends) <= info.max
    out = np.empty(raw.shape, np.int16 if exact else np.float32)
    for i, (slope, intercept) in enumerate(pairs):
        if exact:
            out[i] = raw[i].astype(np.int32) * int(slope) + int(intercept)
        else:
            out[i] = raw[i].astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return out, True


def _invert_monochrome1(ds: Any, raw: np.ndarray) -> tuple[np.ndarray, bool]:
    if str(ds.get("PhotometricInterpretation", "")).upper() != "MONOCHROME1":
        return raw, False
    if raw.dtype.kind == "u":
        top = (1 << int(ds.get("BitsStored", raw.dtype.itemsize * 8))) - 1
        return (top - raw.astype(np.int64)).astype(raw.dtype), True
    if raw.dtype.kind == "i":
        return (-1 - raw.astype(np.int64)).astype(raw.dtype), True  # maps the signed range onto itself
    return (raw.max() + raw.min() - raw).astype(raw.dtype), True


def _pixel_spacing(ds: Any) -> list[float] | None:
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if spacing is None and "SharedFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0]
        if "PixelMeasuresSequence" in shared:
            spacing = shared.PixelMeasuresSequence[0].get("PixelSpacing")
    if spacing is None or len(spacing) != 2:
        return None
    return [float(spacing[0]), float(spacing[1])]


def _common_meta(ds: Any) -> dict[str, Any]:
    body_part = str(ds.get("BodyPartExamined", "") or "") or None
    return {"kind": "dicom", "modality": str(ds.get("Modality", "") or "") or None, "body_part": body_part}


def _load_single_image(ds: Any, path: str) -> tuple[np.ndarray, dict[str, Any]]:
    raw = _pixels(ds, path)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples > 1:
        image = np.moveaxis(raw, -1, 0)  # (H, W, S) -> (S, H, W)
        rescaled, inverted = False, False
    else:
        raw, inverted = _invert_monochrome1(ds, raw)
        image, rescaled = apply_rescale(raw[None], [_rescale(ds)])
    meta = _common_meta(ds) | {
        "spatial_dims": 2,
        "channels": int(image.shape[0]),
        "spacing": _pixel_spacing(ds),
        "orientation": _image_orientation(ds),
        "rescale_applied": rescaled,
        "photometric_inverted": inverted,
    }
    return np.ascontiguousarray(image), meta


def _image_orientation(ds: Any) -> str | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    return orientation_code(np.stack([col, row]))


def _order_slices(where: str, orientations: list, positions: list) -> tuple[np.ndarray, float, np.ndarray]:
    """``(order, step, directions_DHW)`` of slices from their IOP/IPP; raises ``SeriesError``."""
    if any(o is None or len(o) != 6 for o in orientations) or any(p is None or len(p) != 3 for p in positions):
        raise SeriesError(f"{where}: slices lack ImageOrientationPatient/ImagePositionPatient; cannot order them")
    iops = np.asarray(orientations, float)
    if np.abs(iops - iops[0]).max() > _ORIENTATION_TOLERANCE:
        raise SeriesError(f"{where}: mixed slice orientations (ImageOrientationPatient differs between slices)")
    row, col = iops[0, :3], iops[0, 3:]
    normal = np.cross(row, col)
    distance = np.asarray(positions, float) @ normal
    order = np.argsort(distance, kind="stable")
    steps = np.diff(distance[order])
    if np.any(steps <= 1e-4):
        raise SeriesError(f"{where}: two slices share one position along the slice normal")
    step = float(np.median(steps))
    ratio = steps / step
    uneven = np.abs(ratio - 1.0) > _STEP_TOLERANCE
    if np.any(uneven):
        gaps = uneven & (np.abs(ratio - np.round(ratio)) <= _STEP_TOLERANCE) & (np.round(ratio) >= 2)
        if np.any(gaps):
            missing = int(np.sum(np.round(ratio[gaps]) - 1))
            raise SeriesError(f"{where}: {missing} missing slice(s): gap in slice positions (step {step:.4g} mm)")
        raise SeriesError(
            f"{where}: inconsistent slice spacing: steps from {steps.min():.4g} to {steps.max():.4g} mm"
        )
    return order, step, np.stack([normal, col, row])


def _load_stack(datasets: list, paths: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    where = f"series of {len(paths)} files in {Path(paths[0]).parent}"
    first = datasets[0]
    for ds, path in zip(datasets, paths):
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise SeriesError(f"{where}: {path} is {ds.Rows}x{ds.Columns}, others {first.Rows}x{first.Columns}")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise SeriesError(f"{where}: {path} is not single-channel; colour stacks are not volumes")
        if _pixel_spacing(ds) != _pixel_spacing(first):
            raise SeriesError(f"{where}: inconsistent PixelSpacing ({path} differs from {paths[0]})")
    order, step, directions = _order_slices(
        where,
        [ds.get("ImageOrientationPatient") for ds in datasets],
        [ds.get("ImagePositionPatient") for ds in datasets],
    )
    ordered = [datasets[i] for i in order]
    raw = np.stack([_invert_monochrome1(ds, _pixels(ds, paths[i]))[0] for ds, i in zip(ordered, order)])
    volume, rescaled = apply_rescale(raw, [_rescale(ds) for ds in ordered])
    pixel = _pixel_spacing(first)
    volume, spacing, original = to_canonical(volume[None], lps_to_ras(directions),
                                             None if pixel is None else [step] + pixel)
    meta = _common_meta(first) | {
        "spatial_dims": 3,
        "channels": 1,
        "spacing": spacing,
        "orientation": CANONICAL,
        "original_orientation": original,
        "rescale_applied": rescaled,
        "photometric_inverted": str(first.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1",
    }
    return volume, meta


def _frame_geometry(ds: Any) -> tuple[list, list] | None:
    """Per-frame (orientations, positions) from the enhanced functional groups, or None."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        return None
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    orientations, positions = [], []
    for item in per_frame:
        plane = item.get("PlanePositionSequence")
        orient = item.get("PlaneOrientationSequence") or (shared.get("PlaneOrientationSequence") if shared else None)
        if not plane or not orient:
            return None
        positions.append(plane[0].get("ImagePositionPatient"))
        orientations.append(orient[0].get("ImageOrientationPatient"))
    return orientations, positions


def _load_multiframe(ds: Any, path: str) -> tuple[np.ndarray, dict[str, Any]]:
    raw = _pixels(ds, path)
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        raise SeriesError(f"{path}: multi-frame colour DICOM (e.g. ultrasound cine) is not supported")
    raw, inverted = _invert_monochrome1(ds, raw)
    geometry = _frame_geometry(ds)
    pixel = _pixel_spacing(ds)
    directions = None
    if geometry is not None:
        order, step, directions = _order_slices(f"multi-frame file {path}", *geometry)
        raw = raw[order]
        spacing = None if pixel is None else [step] + pixel
    else:
        between = ds.get("SpacingBetweenSlices")
        spacing = None if pixel is None or between is None else [abs(float(between))] + pixel
    volume, rescaled = apply_rescale(raw, [_rescale(ds)] * raw.shape[0])
    volume, original = volume[None], None
    if directions is not None:  # without per-frame geometry the frames' directions are unknown: kept as stored
        volume, spacing, original = to_canonical(volume, lps_to_ras(directions), spacing)
    meta = _common_meta(ds) | {
        "spatial_dims": 3,
        "channels": 1,
        "spacing": spacing,
        "orientation": CANONICAL if directions is not None else None,
        "original_orientation": original,
        "rescale_applied": rescaled,
        "photometric_inverted": inverted,
    }
    return np.ascontiguousarray(volume), meta
