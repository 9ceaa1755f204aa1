"""DICOM reading: series ordering, rescale, multi-frame, MONOCHROME1, bad series; on pydicom's own test files."""
from __future__ import annotations

import random
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.sequence import Sequence

from pretrain.data.dicom import (
    SeriesError,
    group_series,
    has_dicom_preamble,
    load_dicom_series,
    orientation_code,
    read_dicom_header,
)

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")
AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def _slice(i: int, position: list[float], orientation: list[float] = AXIAL) -> Dataset:
    """CT_small with a slice marker: stored value 1000 + i at pixel (0, 0)."""
    ds = pydicom.dcmread(CT)
    raw = ds.pixel_array.copy()
    raw[0, 0] = 1000 + i
    ds.PixelData = raw.tobytes()
    ds.ImagePositionPatient = [float(p) for p in position]
    ds.ImageOrientationPatient = orientation
    return ds


def write_series(
    folder: Path, positions: list[list[float]], orientation: list[float] = AXIAL, seed: int = 0
) -> list[Path]:
    """One file per position, shuffled names and InstanceNumbers unrelated to position."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = [f"img{n:03d}" for n in rng.sample(range(100), len(positions))]
    numbers = rng.sample(range(1, len(positions) + 1), len(positions))
    paths = []
    for i, position in enumerate(positions):
        ds = _slice(i, position, orientation)
        ds.InstanceNumber = numbers[i]
        ds.save_as(folder / names[i])
        paths.append(folder / names[i])
    rng.shuffle(paths)
    return paths


def test_single_ct_slice_is_hounsfield_int16_equal_to_pydicom_modality_lut():
    image, meta = load_dicom_series([CT])
    ds = pydicom.dcmread(CT)
    expected = apply_modality_lut(ds.pixel_array, ds)
    assert image.shape == (1, 128, 128) and image.dtype == np.int16
    np.testing.assert_array_equal(image[0], expected)
    assert meta["kind"] == "dicom" and meta["modality"] == "CT" and meta["rescale_applied"] is True
    assert meta["spacing"] == pytest.approx([float(v) for v in ds.PixelSpacing])
    assert meta["spatial_dims"] == 2 and meta["orientation"] == "PL"


def test_non_integer_rescale_gives_float32_equal_to_pydicom(tmp_path: Path):
    ds = pydicom.dcmread(CT)
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1024.25
    ds.save_as(tmp_path / "a.dcm")
    image, meta = load_dicom_series([tmp_path / "a.dcm"])
    assert image.dtype == np.float32
    np.testing.assert_allclose(image[0], apply_modality_lut(ds.pixel_array, ds), rtol=0, atol=1e-3)


def test_mr_without_rescale_keeps_stored_dtype_and_values():
    image, meta = load_dicom_series([MR])
    ds = pydicom.dcmread(MR)
    assert image.dtype == ds.pixel_array.dtype and meta["rescale_applied"] is False
    np.testing.assert_array_equal(image[0], ds.pixel_array)


@pytest.mark.parametrize(
    "orientation",
    [AXIAL, [1.0, 0.0, 0.0, 0.0, np.cos(0.3), np.sin(0.3)]],  # axial, and tilted 0.3 rad about x
    ids=["axial", "oblique"],
)
def test_slices_ordered_by_position_along_normal_whatever_file_order(tmp_path: Path, orientation: list[float]):
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    origin = np.array([-158.0, -179.0, -30.0])
    distances = [7.5, -5.0, 2.5, 0.0, -2.5, 5.0]  # stored out of order; step 2.5 mm
    positions = [list(origin + d * normal) for d in distances]
    paths = write_series(tmp_path / "s", positions, [float(v) for v in orientation])
    image, meta = load_dicom_series(paths)
    assert image.shape == (1, 6, 128, 128)
    # Axial acquisition order is SPL (rows towards posterior, columns towards the patient's left); stored
    # canonically as SAR, i.e. rows and columns reversed.
    native = image[0, :, ::-1, ::-1]
    markers = native[:, 0, 0].astype(int) + 1024  # HU back to stored value
    expected = [1000 + i for i in np.argsort(distances)]
    assert markers.tolist() == expected
    assert meta["spacing"][0] == pytest.approx(2.5, abs=1e-4)
    ds = pydicom.dcmread(CT)
    hounsfield = apply_modality_lut(ds.pixel_array, ds)
    for k in range(6):  # every slice, marker pixel aside, is CT_small in HU
        np.testing.assert_array_equal(native[k, 1:], hounsfield[1:])
    # Tilting 0.3 rad about x keeps every axis closest to its axial direction.
    assert meta["original_orientation"] == "SPL" and meta["orientation"] == "SAR"


def test_missing_slice_is_reported_as_gap(tmp_path: Path):
    paths = write_series(tmp_path / "gap", [[0, 0, z] for z in (0.0, 2.5, 5.0, 10.0, 12.5)])
    with pytest.raises(SeriesError, match=r"1 missing slice"):
        load_dicom_series(paths)


def test_uneven_spacing_is_reported(tmp_path: Path):
    paths = write_series(tmp_path / "uneven", [[0, 0, z] for z in (0.0, 2.5, 5.0, 6.0, 8.5)])
    with pytest.raises(SeriesError, match="inconsistent slice spacing"):
        load_dicom_series(paths)


def test_mixed_orientation_is_reported(tmp_path: Path):
    paths = write_series(tmp_path / "mixed", [[0, 0, z] for z in (0.0, 2.5, 5.0)])
    ds = pydicom.dcmread(paths[0])
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    ds.save_as(paths[0])
    with pytest.raises(SeriesError, match="mixed slice orientations"):
        load_dicom_series(paths)


def test_changed_pixel_spacing_is_reported(tmp_path: Path):
    paths = write_series(tmp_path / "ps", [[0, 0, z] for z in (0.0, 2.5, 5.0)])
    ds = pydicom.dcmread(paths[1])
    ds.PixelSpacing = [0.9, 0.9]
    ds.save_as(paths[1])
    with pytest.raises(SeriesError, match="inconsistent PixelSpacing"):
        load_dicom_series(paths)


def test_monochrome1_is_inverted(tmp_path: Path):
    ds = pydicom.dcmread(MR)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "xr.dcm")
    image, meta = load_dicom_series([tmp_path / "xr.dcm"])
    raw = pydicom.dcmread(MR).pixel_array.astype(np.int64)
    bits = int(ds.BitsStored)
    expected = (2**bits - 1 - raw) if ds.PixelRepresentation == 0 else (-1 - raw)
    np.testing.assert_array_equal(image[0].astype(np.int64), expected)
    assert meta["photometric_inverted"] is True


def test_multiframe_file_frames_ordered_by_per_frame_position(tmp_path: Path):
    ds = pydicom.dcmread(CT)
    frames = np.stack([ds.pixel_array] * 3).copy()
    frames[:, 0, 0] = [1002, 1000, 1001]  # frame f sits at z = [10, 0, 5][f]
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    shared, orient = Dataset(), Dataset()
    orient.ImageOrientationPatient = AXIAL
    shared.PlaneOrientationSequence = Sequence([orient])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for z in (10.0, 0.0, 5.0):
        item, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = [0.0, 0.0, z]
        item.PlanePositionSequence = Sequence([plane])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.save_as(tmp_path / "mf.dcm")
    image, meta = load_dicom_series([tmp_path / "mf.dcm"])
    assert image.shape == (1, 3, 128, 128) and image.dtype == np.int16
    native = image[0, :, ::-1, ::-1]  # axial SPL frames, stored canonically (SAR)
    assert (native[:, 0, 0].astype(int) + 1024).tolist() == [1000, 1001, 1002]
    assert meta["spacing"] == pytest.approx([5.0, 0.661468, 0.661468])
    assert meta["orientation"] == "SAR" and meta["original_orientation"] == "SPL"
    np.testing.assert_array_equal(native[1, 1:], apply_modality_lut(ds.pixel_array[0], ds)[1:])


def test_header_recognises_files_with_and_without_preamble(tmp_path: Path):
    raw = Path(CT).read_bytes()
    (tmp_path / "no_preamble").write_bytes(raw[132:])  # file meta group first, no 'DICM'
    (tmp_path / "junk.txt").write_bytes(b"patient notes, not DICOM")
    assert has_dicom_preamble(CT) and not has_dicom_preamble(tmp_path / "no_preamble")
    header = read_dicom_header(tmp_path / "no_preamble")
    assert header is not None and header.series_uid == str(pydicom.dcmread(CT).SeriesInstanceUID)
    assert read_dicom_header(tmp_path / "junk.txt") is None
    groups = group_series([read_dicom_header(CT), header])
    assert len(groups) == 1 and len(next(iter(groups.values()))) == 2


def test_orientation_code_letters():
    assert orientation_code(np.array([[0, 0, 1.0], [0, 1.0, 0], [1.0, 0, 0]])) == "SPL"
    assert orientation_code(np.array([[0, 0, -1.0], [0, -1.0, 0], [-1.0, 0, 0]])) == "IAR"


ORIENTATIONS = {  # ImageOrientationPatient (row direction, column direction) in DICOM's LPS coordinates
    "axial": AXIAL,
    "sagittal": [0.0, 1.0, 0.0, 0.0, 0.0, -1.0],
    "coronal": [1.0, 0.0, 0.0, 0.0, 0.0, -1.0],
    "oblique": [float(np.cos(0.4)), float(np.sin(0.4)), 0.0, 0.0, 0.0, -1.0],
    "flipped_axial": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0],
}


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_a_series_is_stored_as_nibabel_stores_the_same_volume_as_nifti(tmp_path: Path, name: str):
    """One orientation for every volume: a DICOM series and a NIfTI file of the same voxels and geometry (its
    affine written from the DICOM geometry, reoriented by nibabel) give the same array, spacing and code."""
    from pretrain.data.nifti import load_nifti

    iop = ORIENTATIONS[name]
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    step, origin = 2.5, np.array([-40.0, 12.0, 7.0])
    distances = [5.0, 0.0, 2.5, 7.5]
    paths = write_series(tmp_path / name, [list(origin + d * normal) for d in distances], iop)
    image, meta = load_dicom_series(paths)

    ds = pydicom.dcmread(CT)
    hounsfield = apply_modality_lut(ds.pixel_array, ds).astype(np.int16)
    native = np.stack([hounsfield] * 4)  # (slice along the normal, row, column), as acquired
    for d, i in enumerate(np.argsort(distances)):
        native[d, 0, 0] = 1000 + i - 1024
    ps_row, ps_col = (float(v) for v in ds.PixelSpacing)
    first = origin + min(distances) * normal
    to_ras = np.array([-1.0, -1.0, 1.0])
    affine = np.eye(4)  # NIfTI voxel axes (column, row, slice): world = origin + i*dc*row + j*dr*col + k*step*normal
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = row * ps_col * to_ras, col * ps_row * to_ras, normal * step * to_ras
    affine[:3, 3] = first * to_ras
    nibabel.save(nibabel.Nifti1Image(native.transpose(2, 1, 0), affine), tmp_path / f"{name}.nii.gz")
    expected, nifti_meta = load_nifti(tmp_path / f"{name}.nii.gz")

    assert image.shape == expected.shape
    np.testing.assert_array_equal(image, expected)
    assert meta["spacing"] == pytest.approx(nifti_meta["spacing"], abs=1e-4)
    assert meta["orientation"] == nifti_meta["orientation"] == "SAR"
    assert meta["original_orientation"] == orientation_code(np.stack([normal, col, row]))
