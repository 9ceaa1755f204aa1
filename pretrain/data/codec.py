"""One sample in a shard, as bytes and back.

A sample is a group of tar members sharing a key (webdataset convention):

- ``<key>.npy``  the image, channels-first, in its native dtype:
  2D ``(C, H, W)``, 3D ``(C, D, H, W)``. 16-bit stays 16-bit.
- ``<key>.json`` metadata: source path, shape, dtype, channels, spatial dims,
  voxel spacing (or null), label index and name (or null).
- ``<key>.cls``  the label index as ASCII, when the sample has one.
- ``<key>.txt``  free text (e.g. a report), when the sample has one.
- ``<key>.seg.npy`` an integer label map on the image's grid, ``(1, *spatial)``,
  when the sample has one (for dense probes); ``meta["mask_labels"]`` names its values.
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from pretrain.data.sample_faults import DECODE, BadSample, check_decoded


class SampleDecodeError(BadSample):
    """A sample's bytes do not decode, or decode to something no model can take; the message names the
    shard and key, ``reason`` says which (see :mod:`pretrain.data.sample_faults`)."""

    def __init__(self, message: str, reason: str = DECODE) -> None:
        super().__init__(message, reason)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_sample(key: str, image: np.ndarray, meta: dict[str, Any], text: str | None = None,
                  mask: np.ndarray | None = None) -> dict[str, Any]:
    """Tar members for one sample, ready for ``webdataset.TarWriter.write``."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/' (webdataset groups members by key)")
    meta = dict(meta, shape=list(image.shape), dtype=str(image.dtype))
    members: dict[str, Any] = {"__key__": key, "npy": _npy_bytes(image), "json": json.dumps(meta).encode()}
    if mask is not None:
        if mask.shape[1:] != image.shape[1:] or mask.shape[0] != 1 or mask.dtype.kind not in "ui":
            raise ValueError(f"sample {key!r}: mask must be an integer array of shape (1, {', '.join(map(str, image.shape[1:]))}), "
                             f"got {mask.dtype} {mask.shape}")
        members["seg.npy"] = _npy_bytes(mask)
    if meta.get("label") is not None:
        members["cls"] = str(int(meta["label"])).encode()
    if text is not None:
        members["txt"] = text.encode("utf-8")
    return members


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """``{"__key__", "__url__", "image", "meta", "label", "text", "mask"}`` from raw tar members
    (``mask`` is None where the sample has none), checked by :func:`check_decoded`."""
    key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
    try:
        image = np.load(io.BytesIO(raw["npy"]), allow_pickle=False)
        meta = json.loads(raw["json"]) if "json" in raw else {}
        mask = np.load(io.BytesIO(raw["seg.npy"]), allow_pickle=False) if "seg.npy" in raw else None
        text = raw["txt"].decode("utf-8") if "txt" in raw else None
    except KeyError as e:
        raise SampleDecodeError(f"{url}: sample {key!r} has no {e.args[0]!r} member") from None
    except Exception as e:  # numpy/json raise many types on damaged bytes
        raise SampleDecodeError(f"{url}: sample {key!r} does not decode: {e}") from e
    sample = {"__key__": key, "__url__": url, "image": image, "meta": meta, "label": None, "text": text, "mask": mask}
    try:
        check_decoded(sample)
    except BadSample as e:
        raise SampleDecodeError(str(e), e.reason) from None
    sample["label"] = meta.get("label")
    return sample
