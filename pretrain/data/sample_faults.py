"""What makes one sample unusable, found before it can reach a batch.

A shard written by any tool can hold a sample whose array has a zero-length
axis, no spatial axes, complex or object values, NaN or inf, or metadata that
is not a JSON object. Each would otherwise fail deep inside a transform (or
worse, pass and turn its whole batch's loss non-finite). The stream rejects
such a sample with a :class:`BadSample` naming its key, shard and reason, counts
it by reason, and goes on with the next one.
"""
from __future__ import annotations

from typing import Any

import numpy as np

# Reasons, as counted in ``data/bad_samples/<reason>``.
DECODE = "decode"  # bytes that are not an .npy / JSON, or a missing member
METADATA = "metadata"  # the .json member is not an object
DTYPE = "dtype"  # complex, string, object or other non-real values
SHAPE = "shape"  # fewer than channel + 2 spatial axes
EMPTY = "empty_axis"  # an axis of length 0
NON_FINITE = "non_finite"  # NaN or inf in the stored image
MASK = "mask"  # a segmentation mask that does not fit its image
TRANSFORM = "transform"  # the objective's transform refused or failed on it
VIEW_NON_FINITE = "non_finite_view"  # the transform made NaN or inf from it

_REAL_KINDS = "biuf"  # bool, signed and unsigned integers, floats


class BadSample(ValueError):
    """One sample the stream skips; ``reason`` is one of this module's reason names."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def where(sample: dict[str, Any]) -> str:
    return f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')!r}"


def check_decoded(sample: dict[str, Any]) -> None:
    """Raise :class:`BadSample` unless the decoded sample's image, metadata and mask can be trained on."""
    image, meta, mask = sample["image"], sample["meta"], sample.get("mask")
    at = where(sample)
    if not isinstance(meta, dict):
        raise BadSample(f"{at}: its .json member is a {type(meta).__name__}, not an object", METADATA)
    if image.dtype.kind not in _REAL_KINDS:
        hint = " (store the magnitude, or real and imaginary parts as channels)" if image.dtype.kind == "c" else ""
        raise BadSample(f"{at}: image dtype {image.dtype} is not real-valued{hint}", DTYPE)
    if image.ndim < 3:
        raise BadSample(f"{at}: image shape {image.shape} has no channel axis and 2 or 3 spatial axes "
                        "(expected (C, H, W) or (C, D, H, W))", SHAPE)
    if 0 in image.shape:
        raise BadSample(f"{at}: image shape {image.shape} has an empty axis", EMPTY)
    if image.dtype.kind == "f":
        bad = image.size - int(np.count_nonzero(np.isfinite(image)))
        if bad:
            raise BadSample(f"{at}: {bad} of its {image.size} values are NaN or inf", NON_FINITE)
    if mask is not None and (mask.ndim != image.ndim or mask.shape[1:] != image.shape[1:]
                             or mask.dtype.kind not in "biu"):
        raise BadSample(f"{at}: mask {mask.dtype} {mask.shape} does not fit image {image.shape}", MASK)


def check_view(sample: dict[str, Any], out: dict[str, Any]) -> None:
    """Raise :class:`BadSample` if a transform's output holds a non-finite float tensor or array."""
    import torch

    for name, value in out.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            finite = bool(torch.isfinite(value).all())
        elif isinstance(value, np.ndarray) and value.dtype.kind == "f":
            finite = bool(np.isfinite(value).all())
        else:
            continue
        if not finite:
            raise BadSample(f"{where(sample)}: the transform made NaN or inf in {name!r}", VIEW_NON_FINITE)


def transform_failure(sample: dict[str, Any], error: Exception) -> BadSample:
    """A transform's own error on one sample, as a :class:`BadSample` that names it."""
    if isinstance(error, BadSample):
        return error
    detail = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
    return BadSample(f"{where(sample)}: {detail}", TRANSFORM)
