"""``iirp.runtime.affine``: rigid-then-affine pre-alignment recovers a known transform
(fixed -> moving points, ITK convention), and transform files are read or rejected clearly."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from support import rotation as _rotation

sitk = pytest.importorskip("SimpleITK")

from iirp.errors import IirpError, TransformError  # noqa: E402
from iirp.runtime.affine import read_transform, register_affine  # noqa: E402

SIZE = (64, 64, 64)  # (x, y, z) voxels
SPACING = 2.0  # mm, isotropic: a 128 mm field of view
MEAN_ERROR_MM = 1.5  # mean |recovered(x) - true(x)| over the foreground
MAX_ERROR_MM = 3.0  # one working-grid voxel


def _ellipsoid(points: np.ndarray, centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    return (((points - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(axis=-1) <= 1.0


@pytest.fixture(scope="module")
def head() -> sitk.Image:
    """A smooth, asymmetric synthetic "head" in [0, 1]: skull shell, brain, ventricles, an off-centre lesion.

    RAS-stored (LPS direction diag(-1, -1, 1)), 64^3 voxels of 2 mm, non-zero origin.
    """
    image = sitk.Image(list(SIZE), sitk.sitkFloat32)
    image.SetSpacing((SPACING,) * 3)
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    image.SetOrigin((63.0, 70.0, -60.0))
    index = np.stack(np.meshgrid(*[np.arange(n) for n in SIZE], indexing="ij"), axis=-1).astype(np.float64)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    points = np.asarray(image.GetOrigin()) + SPACING * index @ direction.T  # (X, Y, Z, 3) mm, LPS
    c = np.asarray(image.TransformContinuousIndexToPhysicalPoint([31.5, 31.5, 31.5]))
    values = np.zeros(SIZE)
    values[_ellipsoid(points, c + (0, 0, 2), (36, 50, 44))] = 0.9  # scalp / skull, three distinct radii
    values[_ellipsoid(points, c + (0, 2, 3), (31, 45, 39))] = 0.45  # brain
    values[_ellipsoid(points, c + (-8, -6, 6), (5, 14, 8))] = 0.1  # left ventricle
    values[_ellipsoid(points, c + (7, -4, 6), (4, 12, 7))] = 0.12  # right ventricle, different
    values[_ellipsoid(points, c + (15, 20, -10), (8, 6, 5))] = 1.0  # lesion
    values[_ellipsoid(points, c + (-5, 30, -20), (10, 8, 6))] = 0.7  # cerebellum-ish
    values[_ellipsoid(points, c + (-18, -25, 22), (6, 5, 9))] = 0.8  # a second bright blob, far from the first
    values[_ellipsoid(points, c + (12, 0, 25), (9, 15, 4))] = 0.25  # a dark slab near the vertex
    array = sitk.GetImageFromArray(values.transpose(2, 1, 0).astype(np.float32))
    array.CopyInformation(image)
    smooth = sitk.SmoothingRecursiveGaussian(array, 2.0)
    return sitk.RescaleIntensity(smooth, 0.0, 1.0)


def _true_transform(head: sitk.Image) -> sitk.AffineTransform:
    """Fixed -> moving: rotation ~8 degrees, scale 1.05, translation ~6 mm about the head's centre."""
    transform = sitk.AffineTransform(3)
    transform.SetCenter(head.TransformContinuousIndexToPhysicalPoint([31.5, 31.5, 31.5]))
    transform.SetMatrix(tuple((1.05 * _rotation((3.0, -4.0, 6.0))).ravel()))  # |angle| ~ 7.8 degrees
    transform.SetTranslation((4.0, -3.0, 3.5))  # |t| ~ 6.1 mm
    return transform


@pytest.fixture(scope="module")
def moving(head: sitk.Image) -> sitk.Image:
    """``head`` seen through the true transform: moving(true(x)) = fixed(x)."""
    return sitk.Resample(head, head, _true_transform(head).GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


@pytest.fixture(scope="module")
def recovered(head: sitk.Image, moving: sitk.Image) -> sitk.AffineTransform:
    return register_affine(head, moving)


def test_register_affine_recovers_known_transform(head: sitk.Image, recovered: sitk.AffineTransform) -> None:
    assert isinstance(recovered, sitk.AffineTransform)
    assert recovered.GetDimension() == 3
    true = _true_transform(head)
    mask = sitk.GetArrayViewFromImage(head) > 0.2
    zyx = np.argwhere(mask)[::7]  # a subsample of the foreground keeps the check fast
    errors = []
    for z, y, x in zyx:
        point = head.TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
        errors.append(np.linalg.norm(np.subtract(recovered.TransformPoint(point), true.TransformPoint(point))))
    errors = np.asarray(errors)
    assert len(errors) > 1000
    assert errors.mean() < MEAN_ERROR_MM, f"mean {errors.mean():.2f} mm, max {errors.max():.2f} mm"
    assert errors.max() < MAX_ERROR_MM, f"mean {errors.mean():.2f} mm, max {errors.max():.2f} mm"


def test_register_affine_is_deterministic(head: sitk.Image, moving: sitk.Image, recovered: sitk.AffineTransform) -> None:
    # fixed sampling seed: the same result up to multi-threaded floating-point summation order
    again = register_affine(head, moving)
    np.testing.assert_allclose(again.GetParameters(), recovered.GetParameters(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(again.GetFixedParameters(), recovered.GetFixedParameters(), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- read_transform


def _example_transform() -> sitk.AffineTransform:
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple((1.02 * _rotation((5.0, 0.0, -3.0))).ravel()))
    transform.SetTranslation((1.5, -2.25, 3.0))
    transform.SetCenter((10.0, 20.0, -5.0))
    return transform


@pytest.mark.parametrize("name", ["affine.tfm", "affine.txt", "affine.mat"])
def test_read_transform_round_trips(tmp_path: Path, name: str) -> None:
    written = _example_transform()
    path = tmp_path / name
    sitk.WriteTransform(written, str(path))
    read = read_transform(path)
    assert read.GetDimension() == 3
    np.testing.assert_allclose(read.GetParameters(), written.GetParameters(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(read.GetFixedParameters(), written.GetFixedParameters(), atol=1e-12)
    for point in [(0.0, 0.0, 0.0), (12.0, -7.0, 33.0)]:
        np.testing.assert_allclose(read.TransformPoint(point), written.TransformPoint(point), atol=1e-9)
    # str paths work as well as PathLike
    assert read_transform(str(path)).GetParameters() == read.GetParameters()


def test_read_transform_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.tfm"
    with pytest.raises(TransformError, match=f"initial transform not found: {re.escape(str(path))}"):
        read_transform(path)


def test_read_transform_directory_is_missing(tmp_path: Path) -> None:
    with pytest.raises(TransformError, match="initial transform not found"):
        read_transform(tmp_path)


@pytest.mark.parametrize("content", [b"this is not a transform\n", b"", b"\x00\x01\x02garbage" * 10])
def test_read_transform_garbage_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.tfm"
    path.write_bytes(content)
    with pytest.raises(
        TransformError, match=f"cannot read initial transform {re.escape(str(path))}: not an ITK transform file"
    ) as info:
        read_transform(path)
    assert isinstance(info.value, IirpError)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_read_transform_rejects_2d(tmp_path: Path) -> None:
    path = tmp_path / "affine2d.tfm"
    sitk.WriteTransform(sitk.AffineTransform(2), str(path))
    with pytest.raises(TransformError, match=f"initial transform {re.escape(str(path))} must be 3D, got 2D"):
        read_transform(path)
