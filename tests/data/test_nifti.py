"""NIfTI reading against nibabel's own canonical reorientation, on nibabel's shipped test volumes."""
from __future__ import annotations

import os
from pathlib import Path

import nibabel
import numpy as np
import pytest
from nibabel.testing import data_path

from pretrain.data.nifti import NiftiError, is_nifti_path, load_nifti


def _canonical_CDHW(path: str | Path) -> tuple[np.ndarray, nibabel.Nifti1Image]:
    canonical = nibabel.as_closest_canonical(nibabel.load(str(path)))
    data = np.asarray(canonical.get_fdata())
    data = data if data.ndim == 4 else data[..., None]
    return data.transpose(3, 2, 1, 0), canonical


@pytest.mark.parametrize("name", ["anatomical.nii", "standard.nii.gz", "example4d.nii.gz", "functional.nii",
                                  "reoriented_anat_moved.nii", "example_nifti2.nii.gz"])
def test_matches_nibabel_closest_canonical(name: str):
    path = os.path.join(data_path, name)
    image, meta = load_nifti(path)
    expected, canonical = _canonical_CDHW(path)
    assert image.shape == expected.shape
    np.testing.assert_allclose(image.astype(np.float64), expected, rtol=1e-6, atol=1e-5)
    assert nibabel.aff2axcodes(canonical.affine) == ("R", "A", "S")
    assert meta["orientation"] == "SAR"
    assert meta["original_orientation"] == "".join(nibabel.aff2axcodes(nibabel.load(path).affine))[::-1]
    assert meta["spacing"] == pytest.approx([float(z) for z in canonical.header.get_zooms()[2::-1]], rel=1e-6)
    assert meta["channels"] == image.shape[0] and meta["spatial_dims"] == 3


def test_left_anterior_superior_file_is_flipped_to_ras(tmp_path: Path):
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    affine = np.diag([-1.5, 2.0, 3.0, 1.0])  # first axis runs towards Left
    nibabel.save(nibabel.Nifti1Image(data, affine), tmp_path / "las.nii.gz")
    image, meta = load_nifti(tmp_path / "las.nii.gz")
    np.testing.assert_array_equal(image[0], data[::-1].transpose(2, 1, 0))
    assert image.dtype == np.int16 and meta["spacing"] == pytest.approx([3.0, 2.0, 1.5])


def test_scl_slope_and_inter_applied(tmp_path: Path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nibabel.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    nibabel.save(img, tmp_path / "ct.nii")
    image, meta = load_nifti(tmp_path / "ct.nii")
    assert image.dtype == np.int16 and meta["rescale_applied"] is True
    np.testing.assert_array_equal(image[0], (data * 2 - 1024).transpose(2, 1, 0))

    img.header.set_slope_inter(0.25, 0.0)
    nibabel.save(img, tmp_path / "mr.nii")
    image, _ = load_nifti(tmp_path / "mr.nii")
    assert image.dtype == np.float32
    np.testing.assert_allclose(image[0], (data * 0.25).transpose(2, 1, 0))


def test_damaged_file_raises_naming_it(tmp_path: Path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(NiftiError, match="broken.nii.gz"):
        load_nifti(bad)
    assert is_nifti_path("a/B.NII.GZ") and is_nifti_path("x.nii") and not is_nifti_path("x.nii.bak")
