"""Read one image file into a channels-first array in its native dtype.

Supported: PNG, JPEG (Pillow), TIFF (tifffile), NPY (numpy). The result is
``(C, H, W)`` for 2D images and ``(C, D, H, W)`` for volumes; 8-bit stays
uint8 and 16-bit stays uint16, so no intensity information is lost before
the training-time transform decides how to normalise.

A sidecar ``<file>.json`` (e.g. ``scan.npy.json``) may set:

- ``"layout"``: how the stored array's axes read, one of ``HW``, ``CHW``,
  ``HWC``, ``DHW``, ``CDHW`` (NPY and TIFF only; PNG/JPEG layout is fixed);
- ``"spacing"``: physical size of one pixel/voxel per spatial axis, in the
  stored axis order (e.g. ``[2.5, 0.7, 0.7]`` for ``DHW``).
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

LAYOUTS = ("HW", "CHW", "HWC", "DHW", "CDHW")
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff")
SUPPORTED_SUFFIXES = PILLOW_SUFFIXES + TIFF_SUFFIXES + (".npy",)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPES_WITH_COLOR_OR_ALPHA = {2: "RGB", 4: "gray+alpha", 6: "RGBA"}
_TIFF_ALPHA_EXTRASAMPLES = (1, 2)  # associated and unassociated alpha
_TIFF_NON_DEPTH_AXES = set("YXSC")


class ReadError(ValueError):
    """A file cannot be turned into an image array; the message names the file."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def sidecar_path(path: str | Path) -> Path:
    """Path of the optional JSON sidecar of an image file (``scan.npy`` -> ``scan.npy.json``)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_image_file(path: str | Path, source: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Read ``path`` as ``(image, meta)``.

    ``image`` is channels-first in its native numeric dtype (bool becomes uint8);
    ``meta`` is ``{"source", "spatial_dims", "channels", "spacing"}`` where
    ``source`` is ``source`` if given (the caller passes the path relative to its
    data root) else ``str(path)``, and ``spacing`` is a list of floats per
    spatial axis or None. Raises ``ReadError`` naming the file on any problem.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ReadError(path, f"unsupported file type {path.suffix!r} (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    if not path.is_file():
        raise ReadError(path, "not a file")
    sidecar = _read_sidecar(path)
    layout = sidecar.get("layout")
    if suffix in PILLOW_SUFFIXES:
        if layout is not None:
            raise ReadError(path, f"sidecar 'layout' applies to .npy and .tif files only, not {suffix}")
        image = _read_pillow(path)
    elif suffix in TIFF_SUFFIXES:
        image = _read_tiff(path, layout)
    else:
        image = _read_npy(path, layout)
    image = _check_values(path, image)
    spatial_dims = image.ndim - 1
    spacing = sidecar.get("spacing")
    if spacing is not None:
        try:
            spacing = parse_spacing(spacing, spatial_dims, where=f"sidecar {sidecar_path(path)}")
        except ValueError as e:
            raise ReadError(path, str(e)) from None
    meta = {
        "source": str(path) if source is None else source,
        "spatial_dims": spatial_dims,
        "channels": int(image.shape[0]),
        "spacing": spacing,
    }
    return image, meta


def parse_spacing(value: Any, spatial_dims: int | None, where: str) -> list[float]:
    """Validate a spacing: finite positive numbers, one per spatial axis.

    ``value`` is a list of numbers or a string ``"0.7 0.7 2.5"`` / ``"0.7,0.7,2.5"``.
    ``spatial_dims=None`` checks the values only. Raises ``ValueError`` naming ``where``.
    """
    if isinstance(value, str):
        value = [part for part in value.replace(",", " ").split() if part]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{where}: spacing must be a non-empty list of numbers, got {value!r}")
    try:
        spacing = [float(v) for v in value if not isinstance(v, bool)]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: spacing {value!r} is not a list of numbers") from None
    if len(spacing) != len(value) or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"{where}: spacing {value!r} must hold finite positive numbers")
    if spatial_dims is not None and len(spacing) != spatial_dims:
        raise ValueError(
            f"{where}: spacing {value!r} has {len(spacing)} values, the image has {spatial_dims} spatial axes"
        )
    return spacing


def _read_sidecar(path: Path) -> dict[str, Any]:
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return {}
    try:
        content = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReadError(path, f"sidecar {sidecar} is not readable JSON: {e}") from e
    if not isinstance(content, dict):
        raise ReadError(path, f"sidecar {sidecar} must hold a JSON object, got {type(content).__name__}")
    layout = content.get("layout")
    if layout is not None and layout not in LAYOUTS:
        raise ReadError(path, f"sidecar {sidecar} has layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    return content


def _apply_layout(path: Path, array: np.ndarray, layout: str) -> np.ndarray:
    """Reorder ``array`` read with ``layout`` into (C, H, W) or (C, D, H, W)."""
    if array.ndim != len(layout):
        raise ReadError(path, f"layout {layout!r} needs a {len(layout)}-d array, the file holds shape {array.shape}")
    if layout in ("HW", "DHW"):
        return array[None]
    if layout == "HWC":
        return np.moveaxis(array, -1, 0)
    return array  # CHW, CDHW are already channels-first


def _read_npy(path: Path, layout: str | None) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as e:  # truncated or foreign bytes raise ValueError/EOFError/OSError/...
        raise ReadError(path, f"not a readable .npy array: {e}") from e
    if not isinstance(array, np.ndarray):
        raise ReadError(path, f"holds a {type(array).__name__}, not a single array")
    if layout is None:
        default = {2: "HW", 3: "DHW", 4: "CDHW"}.get(array.ndim)
        if default is None:
            raise ReadError(
                path,
                f"array of shape {array.shape} has {array.ndim} dimensions; expected 2 (HW), 3 (DHW) or 4 (CDHW), "
                f"or a sidecar layout ({', '.join(LAYOUTS)})",
            )
        layout = default
    return _apply_layout(path, array, layout)


def _png_header(path: Path) -> tuple[int, int] | None:
    """``(bit_depth, color_type)`` from a PNG's IHDR chunk, or None if not a PNG."""
    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    bit_depth, color_type = struct.unpack(">BB", head[24:26])
    return bit_depth, color_type


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    header = _png_header(path) if path.suffix.lower() == ".png" else None
    if header is not None and header[0] == 16 and header[1] in _PNG_COLOR_TYPES_WITH_COLOR_OR_ALPHA:
        # Pillow silently reduces 16-bit colour PNGs to 8 bits per channel.
        kind = _PNG_COLOR_TYPES_WITH_COLOR_OR_ALPHA[header[1]]
        raise ReadError(
            path, f"16-bit {kind} PNG cannot be read without losing bits; convert it to 16-bit TIFF or NPY"
        )
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)  # camera photos (e.g. dermatology) carry a rotation tag
    except Exception as e:  # Pillow raises OSError, SyntaxError, DecompressionBombError, ...
        raise ReadError(path, f"not a readable image: {e}") from e
    return _pillow_to_array(path, image)


def _pillow_to_array(path: Path, image: Any) -> np.ndarray:
    """Channels-first array from a loaded Pillow image, keeping 16 bits where present."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        array = np.asarray(image).astype(np.uint16)  # I;16B reads big-endian; make it native
        return array[None]
    if mode == "I":
        array = np.asarray(image)
        # Older decoders hand 16-bit grayscale PNGs over as 32-bit "I": keep uint16 when the values fit.
        if array.size and array.min() >= 0 and array.max() <= np.iinfo(np.uint16).max:
            array = array.astype(np.uint16)
        return array[None]
    if mode == "F":
        return np.asarray(image, dtype=np.float32)[None]
    if mode in ("L", "LA", "La", "1"):
        return np.asarray(image.convert("L"))[None]
    if mode in ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr"):
        return np.moveaxis(np.asarray(image.convert("RGB")), -1, 0)
    raise ReadError(path, f"unsupported Pillow image mode {mode!r}")


def _read_tiff(path: Path, layout: str | None) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series
            if not series:
                raise ReadError(path, "TIFF holds no image data")
            first = series[0]
            page = first.keyframe
            photometric = int(page.photometric)
            extrasamples = tuple(int(e) for e in page.extrasamples)
            bits_per_sample = int(page.bitspersample)
            colormap = page.colormap
            same_shape = all(s.shape == first.shape and s.dtype == first.dtype and s.axes == first.axes for s in series)
            if len(series) > 1 and same_shape and set(first.axes) <= set("YXS"):
                # Pages written one at a time form one series each: they are the slices of one stack.
                array = np.stack([s.asarray() for s in series])
                axes = "I" + first.axes
            else:
                array, axes = first.asarray(), first.axes  # multi-resolution files: level 0 only
    except ReadError:
        raise
    except Exception as e:  # tifffile raises TiffFileError, ValueError, OSError, ...
        raise ReadError(path, f"not a readable TIFF: {e}") from e
    if layout is not None:
        return _apply_layout(path, array, layout)
    return _tiff_axes_to_channels_first(path, array, axes, photometric, extrasamples, bits_per_sample, colormap)


def _tiff_axes_to_channels_first(
    path: Path,
    array: np.ndarray,
    axes: str,
    photometric: int,
    extrasamples: tuple[int, ...],
    bits_per_sample: int,
    colormap: Any,
) -> np.ndarray:
    """Map tifffile's axis letters onto (C, H, W) or (C, D, H, W).

    Y, X are height and width; S (samples) or C (ImageJ channels) are channels;
    any other single non-singleton axis (pages I/Q, slices Z, time T) is depth.
    """
    if "Y" not in axes or "X" not in axes:
        raise ReadError(path, f"TIFF axes {axes!r} lack Y or X")
    channel_axes = [i for i, a in enumerate(axes) if a in "SC" and array.shape[i] > 1]
    depth_axes = [i for i, a in enumerate(axes) if a not in _TIFF_NON_DEPTH_AXES and array.shape[i] > 1]
    if len(channel_axes) > 1 or len(depth_axes) > 1:
        raise ReadError(
            path,
            f"TIFF has axes {axes!r} with shape {array.shape}; too many to map on (C, D, H, W): give a sidecar layout",
        )
    order = channel_axes + depth_axes + [axes.index("Y"), axes.index("X")]
    kept = set(order)
    array = np.squeeze(array, axis=tuple(i for i in range(array.ndim) if i not in kept))
    remaining = [i for i in range(len(axes)) if i in kept]
    array = np.transpose(array, [remaining.index(i) for i in order])
    if not channel_axes:
        array = array[None]

    if photometric == 3:  # palette: indices into a 16-bit RGB colormap
        if colormap is None or array.shape[0] != 1:
            raise ReadError(path, "palette TIFF without a colormap or with several samples")
        array = np.asarray(colormap)[:, array[0]]
    elif photometric == 0:  # min-is-white: invert so that larger means brighter, like everything else
        if array.dtype == np.bool_:
            array = ~array
        elif array.dtype.kind == "u":
            array = (array.dtype.type((1 << bits_per_sample) - 1) - array).astype(array.dtype)
        else:
            raise ReadError(path, f"min-is-white TIFF with {array.dtype} samples is not supported; convert it")
    elif photometric not in (1, 2):
        raise ReadError(
            path, f"TIFF photometric interpretation {photometric} is not supported; convert to RGB or grayscale"
        )
    alpha = sum(1 for e in extrasamples if e in _TIFF_ALPHA_EXTRASAMPLES)
    if alpha and array.shape[0] > alpha:
        array = array[: array.shape[0] - alpha]  # extra samples come last
    return array


def _check_values(path: Path, image: np.ndarray) -> np.ndarray:
    """Reject arrays a model cannot consume; normalise bool and byte order."""
    if image.size == 0:
        raise ReadError(path, f"image is empty (shape {image.shape})")
    kind = image.dtype.kind
    if kind == "b":
        return image.astype(np.uint8)
    if kind not in "uif":
        raise ReadError(path, f"dtype {image.dtype} is not a real number type")
    if kind == "f" and not np.isfinite(image).all():
        raise ReadError(path, "float data contains NaN or infinity")
    if not image.dtype.isnative:
        image = image.astype(image.dtype.newbyteorder("="))
    return np.ascontiguousarray(image)
