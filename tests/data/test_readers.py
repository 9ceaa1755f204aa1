"""read_image_file: every format keeps its values and bit depth; bad input names the file."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from pretrain.data.readers import ReadError, parse_spacing, read_image_file

RNG = np.random.default_rng(0)


def _u8(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def _u16(*shape: int) -> np.ndarray:
    return RNG.integers(0, 65536, shape, dtype=np.uint16)


def _png_rgb16(path: Path, rgb_HWC: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = rgb_HWC.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb_HWC)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    chunks = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


@pytest.mark.parametrize("pixels", [_u8(5, 7), _u16(5, 7)], ids=["uint8", "uint16"])
def test_grayscale_png_keeps_bit_depth(tmp_path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(tmp_path / "g.PNG")
    image, meta = read_image_file(tmp_path / "g.PNG", source="g.PNG")
    assert image.dtype == pixels.dtype and np.array_equal(image, pixels[None])
    assert meta == {"source": "g.PNG", "spatial_dims": 2, "channels": 1, "spacing": None}


def test_big_endian_16bit_pillow_mode_becomes_native_uint16(tmp_path: Path) -> None:
    pixels = _u16(4, 6)
    Image.frombytes("I;16B", (6, 4), pixels.astype(">u2").tobytes()).save(tmp_path / "b.png")
    image, _ = read_image_file(tmp_path / "b.png")
    assert image.dtype == np.uint16 and image.dtype.isnative and np.array_equal(image[0], pixels)


def test_color_modes_map_to_rgb_or_gray(tmp_path: Path) -> None:
    rgba = _u8(4, 6, 4)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert np.array_equal(read_image_file(tmp_path / "rgba.png")[0], np.moveaxis(rgba[..., :3], -1, 0))

    Image.fromarray(rgba[..., :2], "LA").save(tmp_path / "la.png")
    assert np.array_equal(read_image_file(tmp_path / "la.png")[0], rgba[None, ..., 0])

    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.save(tmp_path / "p.png")
    expected = np.moveaxis(np.asarray(palette.convert("RGB")), -1, 0)
    image, meta = read_image_file(tmp_path / "p.png")
    assert meta["channels"] == 3 and np.array_equal(image, expected)


def test_jpeg_rgb_and_gray_shapes(tmp_path: Path) -> None:
    Image.fromarray(_u8(6, 8, 3)).save(tmp_path / "c.jpeg")
    Image.fromarray(_u8(6, 8)).save(tmp_path / "g.JPG")
    assert read_image_file(tmp_path / "c.jpeg")[0].shape == (3, 6, 8)
    image, _ = read_image_file(tmp_path / "g.JPG")
    assert image.shape == (1, 6, 8) and image.dtype == np.uint8


def test_jpeg_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(_u8(4, 8, 3)).save(tmp_path / "r.jpg", exif=exif)
    assert read_image_file(tmp_path / "r.jpg")[0].shape == (3, 8, 4)


def test_16bit_rgb_png_is_refused_with_a_hint(tmp_path: Path) -> None:
    _png_rgb16(tmp_path / "c16.png", _u16(3, 4, 3))
    with pytest.raises(ReadError, match=r"c16\.png.*16-bit RGB PNG.*TIFF or NPY"):
        read_image_file(tmp_path / "c16.png")


def test_tiff_16bit_gray_rgb_and_alpha(tmp_path: Path) -> None:
    gray, rgb, rgba = _u16(5, 6), _u16(5, 6, 3), _u8(5, 6, 4)
    tifffile.imwrite(tmp_path / "g.tif", gray)
    tifffile.imwrite(tmp_path / "c.tiff", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "a.tif", rgba, photometric="rgb")
    assert np.array_equal(read_image_file(tmp_path / "g.tif")[0], gray[None])
    image, meta = read_image_file(tmp_path / "c.tiff")
    assert image.dtype == np.uint16 and meta["channels"] == 3 and np.array_equal(image, np.moveaxis(rgb, -1, 0))
    assert np.array_equal(read_image_file(tmp_path / "a.tif")[0], np.moveaxis(rgba[..., :3], -1, 0))


def test_multipage_tiff_is_a_volume(tmp_path: Path) -> None:
    volume = _u16(5, 4, 6)
    tifffile.imwrite(tmp_path / "stack.tif", volume)
    with tifffile.TiffWriter(tmp_path / "pages.tif") as writer:
        for page in volume:  # one series per page: still one stack
            writer.write(page)
    for name in ("stack.tif", "pages.tif"):
        image, meta = read_image_file(tmp_path / name)
        assert image.shape == (1, 5, 4, 6) and meta["spatial_dims"] == 3
        assert np.array_equal(image[0], volume)


def test_min_is_white_tiff_is_inverted(tmp_path: Path) -> None:
    pixels = _u8(4, 5)
    tifffile.imwrite(tmp_path / "mw.tif", pixels, photometric="miniswhite")
    assert np.array_equal(read_image_file(tmp_path / "mw.tif")[0][0], 255 - pixels)


@pytest.mark.parametrize(
    "array, shape, dims",
    [
        (np.arange(12, dtype=np.int32).reshape(3, 4), (1, 3, 4), 2),
        (np.arange(24, dtype=np.int16).reshape(2, 3, 4), (1, 2, 3, 4), 3),
        (np.arange(48, dtype=np.float32).reshape(2, 2, 3, 4), (2, 2, 3, 4), 3),
    ],
)
def test_npy_default_layouts(tmp_path: Path, array: np.ndarray, shape: tuple, dims: int) -> None:
    np.save(tmp_path / "a.npy", array)
    image, meta = read_image_file(tmp_path / "a.npy")
    assert image.shape == shape and image.dtype == array.dtype and meta["spatial_dims"] == dims
    assert np.array_equal(image.reshape(array.shape), array)


def test_sidecar_layout_and_spacing(tmp_path: Path) -> None:
    rgb = _u8(4, 5, 3)
    np.save(tmp_path / "rgb.npy", rgb)
    (tmp_path / "rgb.npy.json").write_text(json.dumps({"layout": "HWC", "spacing": [0.5, 0.25], "note": "ignored"}))
    image, meta = read_image_file(tmp_path / "rgb.npy")
    assert np.array_equal(image, np.moveaxis(rgb, -1, 0))
    assert meta["spacing"] == [0.5, 0.25] and meta["channels"] == 3

    planes = _u16(2, 4, 5)
    tifffile.imwrite(tmp_path / "ch.tif", planes, photometric="minisblack", metadata={"axes": "ZYX"})
    (tmp_path / "ch.tif.json").write_text(json.dumps({"layout": "CHW"}))
    image, meta = read_image_file(tmp_path / "ch.tif")
    assert meta["spatial_dims"] == 2 and np.array_equal(image, planes)


def test_bool_becomes_uint8_and_big_endian_becomes_native(tmp_path: Path) -> None:
    mask = RNG.random((3, 4)) > 0.5
    np.save(tmp_path / "m.npy", mask)
    np.save(tmp_path / "be.npy", np.arange(12, dtype=">i2").reshape(3, 4))
    image, _ = read_image_file(tmp_path / "m.npy")
    assert image.dtype == np.uint8 and np.array_equal(image[0], mask.astype(np.uint8))
    image, _ = read_image_file(tmp_path / "be.npy")
    assert image.dtype == np.dtype("int16") and image.dtype.isnative
    assert np.array_equal(image[0], np.arange(12).reshape(3, 4))


def _write_bad(tmp_path: Path, case: str) -> Path:
    """Create one bad input of kind ``case`` and return its path."""
    if case == "random_png":
        path = tmp_path / "noise.png"
        path.write_bytes(RNG.bytes(200))
    elif case == "truncated_npy":
        path = tmp_path / "cut.npy"
        np.save(path, np.zeros((16, 16), np.float32))
        path.write_bytes(path.read_bytes()[:300])
    elif case == "object":
        path = tmp_path / "obj.npy"
        np.save(path, np.array([1, "a"], dtype=object), allow_pickle=True)
    else:
        path = tmp_path / f"{case}.npy"
        array = {
            "complex": np.ones((2, 2), np.complex64),
            "nan": np.array([[1.0, np.nan]]),
            "inf": np.array([[1.0, np.inf]], np.float32),
            "five_dims": np.zeros((1, 1, 2, 2, 2)),
            "empty": np.zeros((0, 4)),
            "bad_layout": np.zeros((2, 3, 4)),
            "bad_spacing": np.zeros((2, 3)),
        }[case]
        np.save(path, array)
        sidecar = {"bad_layout": {"layout": "CDHW"}, "bad_spacing": {"spacing": [1.0, -2.0]}}.get(case)
        if sidecar:
            (tmp_path / f"{case}.npy.json").write_text(json.dumps(sidecar))
    return path


@pytest.mark.parametrize(
    "case, reason",
    [
        ("random_png", "not a readable image"),
        ("truncated_npy", "not a readable .npy"),
        ("object", "not a readable .npy"),
        ("complex", "not a real number type"),
        ("nan", "NaN or infinity"),
        ("inf", "NaN or infinity"),
        ("five_dims", "5 dimensions"),
        ("empty", "empty"),
        ("bad_layout", "layout 'CDHW' needs a 4-d array"),
        ("bad_spacing", "finite positive"),
    ],
)
def test_bad_input_raises_read_error_naming_file(tmp_path: Path, case: str, reason: str) -> None:
    path = _write_bad(tmp_path, case)
    with pytest.raises(ReadError, match=reason) as info:
        read_image_file(path)
    assert str(path) in str(info.value) and info.value.path == str(path)
    assert isinstance(info.value, ValueError)


def test_unsupported_extension_and_unknown_layout(tmp_path: Path) -> None:
    (tmp_path / "scan.dcm").write_bytes(b"DICM")
    with pytest.raises(ReadError, match=r"scan\.dcm.*unsupported file type"):
        read_image_file(tmp_path / "scan.dcm")
    np.save(tmp_path / "v.npy", np.zeros((2, 3)))
    (tmp_path / "v.npy.json").write_text(json.dumps({"layout": "WH"}))
    with pytest.raises(ReadError, match=r"v\.npy.*layout 'WH'"):
        read_image_file(tmp_path / "v.npy")
    Image.fromarray(_u8(3, 3)).save(tmp_path / "p.png")
    (tmp_path / "p.png.json").write_text(json.dumps({"layout": "HW"}))
    with pytest.raises(ReadError, match="applies to .npy and .tif"):
        read_image_file(tmp_path / "p.png")


def test_parse_spacing_forms_and_errors() -> None:
    assert parse_spacing("0.7 0.7 2.5", 3, "x") == [0.7, 0.7, 2.5]
    assert parse_spacing("0.7,0.7, 2.5", 3, "x") == [0.7, 0.7, 2.5]
    assert parse_spacing([1, 2], None, "x") == [1.0, 2.0]
    for bad in ("a b", "", [0.0, 1.0], [True, 1.0], "nan 1"):
        with pytest.raises(ValueError, match="where.csv:4"):
            parse_spacing(bad, None, "where.csv:4")
    with pytest.raises(ValueError, match="has 2 values, the image has 3"):
        parse_spacing("1 1", 3, "x")
