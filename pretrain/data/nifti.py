"""NIfTI volumes (``.nii``, ``.nii.gz``) to channels-first arrays in RAS canonical orientation
(``pretrain.data.orientation``: the orientation DICOM series are stored in too).

The image is reoriented to the orientation ``nibabel.as_closest_canonical``
gives (axes permuted and flipped, never resampled; done on the stored values
so the dtype survives), so the first three data axes run towards
Right, Anterior, Superior. It is stored as ``(C, D, H, W)`` with

    D = S (inferior -> superior), H = A (posterior -> anterior), W = R (left -> right)

i.e. the canonical ``(X, Y, Z)`` array transposed to ``(Z, Y, X)``; the
``orientation`` code is therefore ``"SAR"`` and ``spacing`` is the canonical
zooms reversed, ``[dz, dy, dx]`` in mm. A 4-D image (time points or
components) puts its fourth axis on C, or one chosen volume is read
(medical conversion's ``--nifti-4d samples``). ``scl_slope``/``scl_inter`` are
applied: int16 when slope and intercept are integers and the result fits,
float32 otherwise; unscaled data keeps its stored dtype.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data.dicom import apply_rescale
from pretrain.data.orientation import CANONICAL

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class NiftiError(ValueError):
    """A NIfTI file cannot be read into a volume; the message names the file."""


def is_nifti_path(path: str | Path) -> bool:
    """True for names ending in ``.nii`` or ``.nii.gz`` (any case)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _orientation_letters(affine: np.ndarray) -> str:
    import nibabel

    return "".join(nibabel.aff2axcodes(affine))


def time_points(path: str | Path) -> int:
    """How many volumes a NIfTI file holds along its 4th axis (1 for a 3-D image), from its header alone."""
    import nibabel

    shape = nibabel.load(str(path)).shape
    return int(shape[3]) if len(shape) >= 4 else 1


def load_nifti(path: str | Path, time_point: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Read ``path`` as ``(image_CDHW, meta)``; raises ``NiftiError`` naming the file.

    ``meta``: ``kind, modality (None), body_part (None), spatial_dims (3),
    channels, spacing [dz, dy, dx], orientation ("SAR"), original_orientation,
    rescale_applied`` (and ``time_point``). A 4-D image's volumes become channels,
    or, with ``time_point``, that one volume is read.
    """
    import nibabel

    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    pick = time_point  # which volume of the 4th axis is kept below (0 once only that one was read)
    try:
        img = nibabel.load(str(path))
        proxy = img.dataobj
        # Reorient the stored values ourselves: as_closest_canonical would hand back scaled float64 data.
        if time_point is not None and len(img.shape) == 4 and 0 <= time_point < img.shape[3] \
                and hasattr(proxy, "_get_unscaled"):
            # one volume of a long series: read only its bytes, not the whole file once per volume
            unscaled = np.asarray(proxy._get_unscaled((slice(None),) * 3 + (slice(time_point, time_point + 1),)))
            pick = 0
        else:
            unscaled = np.asarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy)
        slope = float(getattr(proxy, "slope", 1.0))
        inter = float(getattr(proxy, "inter", 0.0))
        ornt = io_orientation(img.affine)
        raw = apply_orientation(unscaled, ornt) if unscaled.ndim >= 3 else unscaled
        canonical_affine = img.affine @ inv_ornt_aff(ornt, img.shape[:3])
        zooms_in = [float(z) for z in img.header.get_zooms()[:3]]
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError, zlib errors, ...
        raise NiftiError(f"{path}: not a readable NIfTI image: {e}") from e
    zooms_in += [1.0] * (3 - len(zooms_in))
    zooms = [0.0, 0.0, 0.0]
    for axis_in, (axis_out, _) in enumerate(ornt):
        zooms[int(axis_out)] = zooms_in[axis_in]  # a permutation moves the voxel size with its axis
    if raw.ndim < 3:
        raw = raw.reshape(raw.shape + (1,) * (3 - raw.ndim))
    if raw.ndim == 5 and raw.shape[3] == 1:
        raw = raw[:, :, :, 0]  # NIfTI puts vector components on the 5th axis behind a singleton time axis
    if raw.ndim > 4:
        raise NiftiError(f"{path}: {raw.ndim}-d data of shape {raw.shape}; only 3-d and 4-d images are supported")
    if raw.size == 0:
        raise NiftiError(f"{path}: image is empty (shape {raw.shape})")
    if raw.dtype.kind not in "uif":
        raise NiftiError(f"{path}: data type {raw.dtype} is not a real number type (RGB NIfTI is not supported)")
    if raw.ndim == 3:
        raw = raw[..., None]
    if pick is not None:
        if not 0 <= pick < raw.shape[3]:
            raise NiftiError(f"{path}: no time point {time_point} (the image has {raw.shape[3]})")
        raw = raw[..., pick:pick + 1]
    image = np.transpose(raw, (3, 2, 1, 0))  # (X, Y, Z, C) -> (C, Z, Y, X)
    rescaled = not (math.isclose(slope, 1.0) and inter == 0.0) and math.isfinite(slope) and math.isfinite(inter)
    if rescaled:
        image, _ = apply_rescale(image, [(slope, inter)] * image.shape[0])
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise NiftiError(f"{path}: data contains NaN or infinity")
    if not image.dtype.isnative:
        image = image.astype(image.dtype.newbyteorder("="))
    spacing = zooms[::-1] if all(math.isfinite(z) and z > 0 for z in zooms) else None
    axes = _orientation_letters(canonical_affine)  # "RAS" after as_closest_canonical
    if axes[::-1] != CANONICAL:
        raise NiftiError(f"{path}: reorientation gave {axes[::-1]}, not {CANONICAL}")  # nibabel changed its canon
    meta = {
        "kind": "nifti",
        "modality": None,
        "body_part": None,
        "spatial_dims": 3,
        "channels": int(image.shape[0]),
        "spacing": spacing,
        "orientation": CANONICAL,
        "original_orientation": _orientation_letters(img.affine)[::-1],  # the file's (k, j, i) axes
        "rescale_applied": bool(rescaled),
        **({"time_point": int(time_point)} if time_point is not None else {}),
    }
    return np.ascontiguousarray(image), meta
