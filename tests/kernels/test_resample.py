"""The numba output resampling (:mod:`iirp.kernels.resample`) against SimpleITK's own resampling through the flow
as a displacement field: nearest neighbour for labels, linear for images."""

from __future__ import annotations

import numpy as np
import pytest

from iirp.kernels.resample import warp_image, warp_labels

sitk = pytest.importorskip("SimpleITK")


def _itk(volume: np.ndarray, flow: np.ndarray, linear: bool = False) -> np.ndarray:
    """``sitk.Resample`` (nearest, or linear into float32) through the flow as a displacement field (1 mm,
    identity geometry: index space is physical space)."""
    image = sitk.GetImageFromArray(volume.transpose(2, 1, 0))
    field = sitk.GetImageFromArray(flow.transpose(3, 2, 1, 0).astype(np.float64), isVector=True)
    transform = sitk.DisplacementFieldTransform(field)
    if linear:
        out = sitk.Resample(image, image, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    else:
        out = sitk.Resample(image, image, transform, sitk.sitkNearestNeighbor, 0, image.GetPixelID())
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.uint16, np.int64])
@pytest.mark.parametrize("shape", [(9, 7, 5), (16, 12, 20), (1, 6, 4)])
def test_matches_simpleitk_nearest(dtype: type, shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 50, shape).astype(dtype)
    flow = rng.uniform(-3.3, 3.3, (3, *shape)).astype(np.float32)  # many points outside; no exact ties
    got = warp_labels(labels, flow)
    assert got.dtype == labels.dtype and got.shape == labels.shape
    np.testing.assert_array_equal(got, _itk(labels, flow))


@pytest.mark.parametrize("nudge", [0.0, 2.0**-24, -(2.0**-24), 2.0**-22])
def test_half_voxel_ties_and_near_ties_match_simpleitk(nudge: float) -> None:
    # exact ties round up, as ITK's RoundHalfIntegerUp; near ties round by the exact sum, as ITK in double
    rng = np.random.default_rng(11)
    shape = (12, 10, 8)
    labels = rng.integers(1, 200, shape).astype(np.int16)
    halves = np.round(rng.uniform(-4, 4, (3, *shape)) * 2) / 2
    flow = (halves + nudge * rng.choice([-1, 1], halves.shape)).astype(np.float32)
    np.testing.assert_array_equal(warp_labels(labels, flow), _itk(labels, flow))


def test_identity_and_whole_voxel_shift() -> None:
    labels = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    np.testing.assert_array_equal(warp_labels(labels, np.zeros((3, 4, 5, 6), np.float32)), labels)
    shift = np.zeros((3, 4, 5, 6), np.float32)
    shift[1] = 1.0
    expected = np.zeros_like(labels)
    expected[:, :-1] = labels[:, 1:]
    np.testing.assert_array_equal(warp_labels(labels, shift), expected)


def test_argument_checks() -> None:
    with pytest.raises(TypeError, match=r"warp_labels\(\) 'labels' must be an integer array, got dtype float32"):
        warp_labels(np.zeros((2, 2, 2), np.float32), np.zeros((3, 2, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"warp_labels\(\) 'flow' must have shape \(3, 2, 2, 2\)"):
        warp_labels(np.zeros((2, 2, 2), np.int16), np.zeros((3, 2, 2, 3), np.float32))
    labels = np.zeros((2, 2, 2), np.int16)
    with pytest.raises(ValueError, match=r"'out' must be a writeable C-contiguous int16 array"):
        warp_labels(labels, np.zeros((3, 2, 2, 2), np.float32), out=np.zeros((2, 2, 2), np.int32))


# --------------------------------------------------------------------------- warp_image


@pytest.mark.parametrize("shape", [(9, 7, 5), (16, 12, 20), (1, 6, 4), (2, 1, 3)])
@pytest.mark.parametrize("reach", [0.6, 3.3])
def test_image_matches_simpleitk_linear(shape: tuple[int, int, int], reach: float) -> None:
    # points everywhere: inside, in the half voxel beyond the edge voxels (ITK holds the edge value), outside
    rng = np.random.default_rng(3)
    image = rng.uniform(-50, 150, shape).astype(np.float32)
    flow = rng.uniform(-reach, reach, (3, *shape)).astype(np.float32)
    got = warp_image(image, flow)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, _itk(image, flow, linear=True))


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float64])
def test_image_of_other_types_is_read_as_float32(dtype: type) -> None:
    rng = np.random.default_rng(4)
    image = rng.integers(0, 200, (8, 9, 10)).astype(dtype)
    flow = rng.uniform(-2, 2, (3, 8, 9, 10)).astype(np.float32)
    np.testing.assert_array_equal(warp_image(image, flow), _itk(image.astype(np.float32), flow, linear=True))


def test_image_edges_by_hand() -> None:
    image = np.array([10.0, 20.0, 40.0], np.float32).reshape(3, 1, 1)  # n = 3 along x
    expected = {0.0: 10.0, 0.25: 12.5, 1.5: 30.0, 2.0: 40.0, -0.25: 10.0, -0.5: 10.0, -0.5000001: 0.0,
                2.25: 40.0, 2.4999998: 40.0, 2.5: 0.0, float("nan"): 0.0, float("inf"): 0.0}  # point -> value
    for point, value in expected.items():
        flow = np.zeros((3, 3, 1, 1), np.float32)
        flow[0, 0] = np.float32(point)  # voxel 0 samples at x = point
        assert warp_image(image, flow)[0, 0, 0] == np.float32(value), point


def test_image_identity_is_exact_and_out_is_used() -> None:
    image = np.random.default_rng(5).standard_normal((6, 7, 8)).astype(np.float32)
    out = np.empty_like(image)
    assert warp_image(image, np.zeros((3, 6, 7, 8), np.float32), out=out) is out
    np.testing.assert_array_equal(out, image)
    with pytest.raises(ValueError, match=r"warp_image\(\) 'out' must be a writeable C-contiguous float32"):
        warp_image(image, np.zeros((3, 6, 7, 8), np.float32), out=image)
    with pytest.raises(ValueError, match=r"warp_image\(\) 'flow' must have shape \(3, 6, 7, 8\)"):
        warp_image(image, np.zeros((3, 6, 7, 7), np.float32))
