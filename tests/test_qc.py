"""The QC picture: arrays in RAS whatever the storage order, and a PNG written whole."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from iirp.qc import qc_slices, write_qc_png
from iirp.runtime.geometry import array_from_image


def _lps_image(shape_xyz: tuple[int, int, int] = (16, 20, 12)) -> sitk.Image:
    """An image stored in LPS order (identity direction) whose voxel value is its i index + 1."""
    x = np.arange(shape_xyz[0], dtype=np.float32) + 1
    array = np.broadcast_to(x[None, None, :], shape_xyz[::-1]).copy()  # numpy (z, y, x)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 2.0, 1.5))
    return image


def _field(image: sitk.Image, shift_mm: tuple[float, float, float]) -> sitk.Image:
    vectors = np.broadcast_to(np.asarray(shift_mm, np.float64), (*sitk.GetArrayFromImage(image).shape, 3)).copy()
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.CopyInformation(image)
    return field


def test_qc_slices_are_ras_with_voxel_displacements() -> None:
    image = _lps_image()
    data = qc_slices(image, image, image, _field(image, (3.0, -4.0, 1.5)))
    # stored LPS (i grows to the left): shown RAS, so the first array axis now grows to the right
    np.testing.assert_array_equal(data["fixed"][:, 0, 0], array_from_image(image)[::-1, 0, 0])
    assert data["spacing"] == (1.0, 2.0, 1.5)
    # +3 mm along L is -3 voxels along R; -4 mm along P is +2 voxels along A; +1.5 mm S is +1 voxel
    np.testing.assert_allclose(data["displacement"][:, 5, 5, 5], [-3.0, 2.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(data["jacobian"], 1.0, atol=1e-9)


def test_write_qc_png(tmp_path) -> None:
    image = _lps_image()
    rng = np.random.default_rng(0)
    vectors = rng.normal(scale=3.0, size=(*sitk.GetArrayFromImage(image).shape, 3))  # rough: some folding
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.CopyInformation(image)
    out = tmp_path / "qc.png"
    write_qc_png(out, image, image, image, field, title="test pair")
    head = out.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert (width, height) == (2100, 1100)
    assert [p.name for p in tmp_path.iterdir()] == ["qc.png"]  # no temporary left behind


def test_write_qc_png_failure_leaves_nothing(tmp_path) -> None:
    image = _lps_image()
    with pytest.raises((RuntimeError, ValueError)):
        write_qc_png(tmp_path / "qc.png", image, image, image, image)  # a scalar image is not a field
    assert list(tmp_path.iterdir()) == []
