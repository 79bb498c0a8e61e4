"""``iirp.runtime.geometry``: index order at the I/O boundary, lossless reorientation,
the model grid and grid comparison (conventions in the module docstring and SPEC.md section 3)."""

from __future__ import annotations

import numpy as np
import pytest
from support import rotation as _rotation

sitk = pytest.importorskip("SimpleITK")

from iirp.runtime.geometry import (  # noqa: E402
    MODEL_ORIENTATION,
    ModelGrid,
    array_from_image,
    foreground_center,
    image_from_array,
    model_grid_for,
    orient,
    orientation_direction,
    same_grid,
)

RAS_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # LPS direction cosines of RAS storage
LPS_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# Column c is the physical (LPS) direction of index axis c: i -> Superior, j -> Right, k -> Anterior.
PERMUTED_DIRECTION = (0.0, -1.0, 0.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0)
GEOMETRY_ATOL = 1e-9  # mm, geometry copied without arithmetic
INDEX_ATOL = 1e-6  # voxels, continuous index of a voxel centre after reorientation


# --------------------------------------------------------------------------- helpers


def _image(
    array: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    direction: tuple[float, ...] = LPS_DIRECTION,
) -> sitk.Image:
    """``(X, Y, Z)`` array -> image, built with SimpleITK's own (z, y, x) API (independent of the code under test)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def _physical_points(image: sitk.Image) -> np.ndarray:
    """``(X, Y, Z, 3)`` float64 physical position (mm, LPS) of every voxel centre."""
    grid = ModelGrid.of(image)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in grid.size], indexing="ij"), axis=-1)
    return np.asarray(grid.origin) + index @ grid.index_to_physical_matrix().T


def _assert_physically_same(a: sitk.Image, b: sitk.Image) -> None:
    """Every voxel of ``a`` sits on a voxel centre of ``b`` with the same value, and both have as many voxels."""
    assert np.prod(a.GetSize()) == np.prod(b.GetSize())
    grid_b = ModelGrid.of(b)
    points = _physical_points(a).reshape(-1, 3)
    index_b = (points - np.asarray(grid_b.origin)) @ np.linalg.inv(grid_b.index_to_physical_matrix()).T
    rounded = np.rint(index_b)
    np.testing.assert_allclose(index_b, rounded, atol=INDEX_ATOL)
    rounded = rounded.astype(int)
    assert (rounded >= 0).all() and (rounded < np.asarray(b.GetSize())).all()
    values_a = array_from_image(a, dtype=None).reshape(-1)
    values_b = array_from_image(b, dtype=None)[rounded[:, 0], rounded[:, 1], rounded[:, 2]]
    np.testing.assert_array_equal(values_a, values_b)
    # a one-to-one map: no voxel of b is hit twice
    assert len(np.unique(rounded, axis=0)) == len(rounded)


def _cube_image(
    size: tuple[int, int, int],
    lo: tuple[int, int, int],
    hi: tuple[int, int, int],
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    direction: tuple[float, ...],
    background: float,
    foreground: float,
    noise: float,
    seed: int = 0,
) -> sitk.Image:
    """Noisy background with a bright box of voxels ``lo..hi`` (inclusive, index space)."""
    rng = np.random.default_rng(seed)
    array = background + noise * rng.standard_normal(size)
    array[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = foreground
    return _image(array.astype(np.float32), spacing, origin, direction)


@pytest.fixture()
def ras_volume() -> sitk.Image:
    """A small RAS-stored int16 volume with distinct voxel values, anisotropic spacing, non-zero origin."""
    values = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    return _image(values, spacing=(0.7, 1.3, 2.1), origin=(12.5, -4.0, 30.25), direction=RAS_DIRECTION)


# --------------------------------------------------------------------------- array <-> image


def test_array_from_image_uses_index_order_ijk() -> None:
    image = sitk.Image([4, 5, 6], sitk.sitkFloat32)
    rng = np.random.default_rng(1)
    for index in [(0, 0, 0), (3, 0, 0), (0, 4, 0), (0, 0, 5), (1, 2, 3), (3, 4, 5)]:
        image.SetPixel(index, float(rng.uniform(1, 100)))
    array = array_from_image(image)
    assert array.shape == (4, 5, 6)
    assert array.dtype == np.float32
    assert array.flags["C_CONTIGUOUS"]
    for i in range(4):
        for j in range(5):
            for k in range(6):
                assert array[i, j, k] == image.GetPixel(i, j, k)


def test_array_from_image_dtype_none_keeps_pixel_type() -> None:
    image = sitk.Image([3, 4, 5], sitk.sitkInt16)
    image.SetPixel((2, 3, 4), -7)
    array = array_from_image(image, dtype=None)
    assert array.dtype == np.int16
    assert array[2, 3, 4] == -7


def test_image_from_array_places_array_index_at_image_index() -> None:
    array = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    image = image_from_array(array, ModelGrid((3, 4, 5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), LPS_DIRECTION))
    assert image.GetSize() == (3, 4, 5)
    for index in [(0, 0, 0), (2, 0, 0), (0, 3, 0), (0, 0, 4), (1, 2, 3), (2, 3, 4)]:
        assert image.GetPixel(index) == array[index]


def test_scalar_round_trip_keeps_values_and_geometry(ras_volume: sitk.Image) -> None:
    array = array_from_image(ras_volume, dtype=None)
    back = image_from_array(array, ras_volume)
    assert back.GetPixelID() == ras_volume.GetPixelID()
    assert back.GetSize() == ras_volume.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), ras_volume.GetSpacing(), atol=GEOMETRY_ATOL)
    np.testing.assert_allclose(back.GetOrigin(), ras_volume.GetOrigin(), atol=GEOMETRY_ATOL)
    np.testing.assert_allclose(back.GetDirection(), ras_volume.GetDirection(), atol=GEOMETRY_ATOL)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(ras_volume))


def test_vector_round_trip_keeps_components_and_geometry() -> None:
    direction = tuple(_rotation((10.0, -20.0, 35.0)).ravel())
    grid = ModelGrid((4, 5, 6), (0.5, 2.0, 3.0), (1.0, 2.0, 3.0), direction)
    rng = np.random.default_rng(2)
    array = rng.standard_normal((4, 5, 6, 3))
    image = image_from_array(array, grid)
    assert image.GetNumberOfComponentsPerPixel() == 3
    assert image.GetPixelID() == sitk.sitkVectorFloat64
    assert image.GetSize() == (4, 5, 6)
    assert ModelGrid.of(image) == grid
    assert image.GetPixel(1, 2, 3) == pytest.approx(tuple(array[1, 2, 3]))
    assert image.GetPixel(3, 0, 5) == pytest.approx(tuple(array[3, 0, 5]))
    back = sitk.GetArrayFromImage(image).transpose(2, 1, 0, 3)
    np.testing.assert_array_equal(back, array)


def test_image_from_array_accepts_image_or_model_grid(ras_volume: sitk.Image) -> None:
    array = np.zeros(ras_volume.GetSize(), dtype=np.float32)
    a = image_from_array(array, ras_volume)
    b = image_from_array(array, ModelGrid.of(ras_volume))
    assert ModelGrid.of(a) == ModelGrid.of(b) == ModelGrid.of(ras_volume)


@pytest.mark.parametrize("shape", [(6, 5, 7), (5, 6), (7, 6, 5, 3), (5, 6, 8)])
def test_image_from_array_rejects_wrong_shape(ras_volume: sitk.Image, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"image_from_array\(\) 'array' must have shape \(5, 6, 7\)"):
        image_from_array(np.zeros(shape, dtype=np.float32), ras_volume)


def test_model_grid_helpers() -> None:
    direction = tuple(_rotation((0.0, 30.0, 0.0)).ravel())
    grid = ModelGrid((4, 5, 6), (0.5, 2.0, 3.0), (1.0, 2.0, 3.0), direction)
    assert grid.shape == (4, 5, 6)
    np.testing.assert_allclose(grid.index_to_physical_matrix(), _rotation((0.0, 30.0, 0.0)) @ np.diag([0.5, 2, 3]))
    ref = grid.reference_image(sitk.sitkUInt8)
    assert ref.GetPixelID() == sitk.sitkUInt8
    assert ModelGrid.of(ref) == grid
    # the matrix agrees with ITK's own index -> physical mapping
    np.testing.assert_allclose(
        ref.TransformIndexToPhysicalPoint((1, 2, 3)),
        np.asarray(grid.origin) + grid.index_to_physical_matrix() @ [1, 2, 3],
        atol=1e-9,
    )
    assert grid.to_dict() == {
        "size": [4, 5, 6],
        "spacing": [0.5, 2.0, 3.0],
        "origin": [1.0, 2.0, 3.0],
        "direction": list(direction),
    }


# --------------------------------------------------------------------------- orientation


def test_orientation_direction_ras_and_lps() -> None:
    assert MODEL_ORIENTATION == "RAS"
    assert orientation_direction("RAS") == RAS_DIRECTION
    assert orientation_direction() == RAS_DIRECTION
    assert orientation_direction("LPS") == LPS_DIRECTION


def _layouts(ras: sitk.Image) -> dict[str, sitk.Image]:
    return {
        "permute_axes": sitk.PermuteAxes(ras, [2, 0, 1]),
        "flip_i": sitk.Flip(ras, [True, False, False]),
        "flip_jk": sitk.Flip(ras, [False, True, True]),
        "permute_and_flip": sitk.Flip(sitk.PermuteAxes(ras, [1, 2, 0]), [True, False, True]),
    }


@pytest.mark.parametrize("layout", ["permute_axes", "flip_i", "flip_jk", "permute_and_flip"])
def test_orient_restores_ras_layout_of_other_storage(ras_volume: sitk.Image, layout: str) -> None:
    stored = _layouts(ras_volume)[layout]
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(stored.GetDirection()) != "RAS"
    _assert_physically_same(stored, ras_volume)  # the layouts are the same physical image
    oriented = orient(stored, "RAS")
    np.testing.assert_allclose(oriented.GetDirection(), orientation_direction("RAS"), atol=GEOMETRY_ATOL)
    assert oriented.GetPixelID() == ras_volume.GetPixelID()
    # the RAS layout of one physical image is unique: exactly the volume it was built from
    assert oriented.GetSize() == ras_volume.GetSize()
    np.testing.assert_allclose(oriented.GetSpacing(), ras_volume.GetSpacing(), atol=GEOMETRY_ATOL)
    np.testing.assert_allclose(oriented.GetOrigin(), ras_volume.GetOrigin(), atol=1e-6)
    np.testing.assert_array_equal(array_from_image(oriented, None), array_from_image(ras_volume, None))
    _assert_physically_same(oriented, stored)


@pytest.mark.parametrize(
    "direction",
    [LPS_DIRECTION, PERMUTED_DIRECTION, (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0)],
    ids=["lps_identity", "permuted_SRA", "permuted_LIP"],
)
def test_orient_keeps_every_voxel_at_its_physical_position(direction: tuple[float, ...]) -> None:
    rng = np.random.default_rng(3)
    values = rng.integers(-500, 500, size=(4, 6, 5)).astype(np.float32)
    stored = _image(values, spacing=(0.9, 1.7, 2.6), origin=(-3.0, 11.0, 7.5), direction=direction)
    oriented = orient(stored, "RAS")
    assert oriented.GetDirection() == orientation_direction("RAS")
    assert sorted(oriented.GetSpacing()) == sorted(stored.GetSpacing())
    _assert_physically_same(oriented, stored)
    _assert_physically_same(stored, oriented)
    # cross-check with ITK's own point mapping, value at the same physical point
    for index in [(0, 0, 0), (3, 5, 4), (1, 2, 3), (2, 0, 4)]:
        point = stored.TransformIndexToPhysicalPoint(index)
        assert oriented.GetPixel(oriented.TransformPhysicalPointToIndex(point)) == stored.GetPixel(index)
    # and with nearest-neighbour resampling onto the oriented grid: exact
    resampled = sitk.Resample(stored, oriented, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkNearestNeighbor, -9999.0)
    np.testing.assert_array_equal(array_from_image(resampled), array_from_image(oriented))


def test_orient_returns_ras_input_unchanged(ras_volume: sitk.Image) -> None:
    assert orient(ras_volume, "RAS") is ras_volume
    assert orient(ras_volume) is ras_volume


def test_orient_to_other_code() -> None:
    stored = _image(np.arange(24, dtype=np.float32).reshape(2, 3, 4), direction=RAS_DIRECTION)
    lps = orient(stored, "LPS")
    assert lps.GetDirection() == LPS_DIRECTION
    _assert_physically_same(lps, stored)


# --------------------------------------------------------------------------- model grid


def test_model_grid_for_fixed_with_model_size_and_spacing_is_its_own_grid(ras_volume: sitk.Image) -> None:
    grid, voxel_for_voxel = model_grid_for(ras_volume, (5, 6, 7), (0.7, 1.3, 2.1))
    assert voxel_for_voxel is True
    assert grid == ModelGrid.of(ras_volume)
    assert same_grid(grid, ras_volume)


def test_model_grid_for_default_spacing_is_1mm() -> None:
    image = _image(np.ones((8, 8, 8), dtype=np.float32), direction=RAS_DIRECTION)
    grid, voxel_for_voxel = model_grid_for(image, (8, 8, 8))
    assert voxel_for_voxel is True
    assert grid == ModelGrid.of(image)


def test_model_grid_for_other_grid_is_centred_on_foreground() -> None:
    # 40 x 30 x 50 voxels at 0.8 x 1.5 x 1.2 mm, stored LPS, foreground off-centre
    fixed = _cube_image(
        (40, 30, 50), (5, 10, 20), (20, 25, 44), (0.8, 1.5, 1.2), (-20.0, 35.0, -12.0), LPS_DIRECTION,
        background=0.0, foreground=1.0, noise=0.02,
    )
    model_size, model_spacing = (32, 24, 16), (1.0, 1.25, 2.0)
    grid, voxel_for_voxel = model_grid_for(fixed, model_size, model_spacing)
    assert voxel_for_voxel is False
    assert grid.size == model_size
    assert all(isinstance(n, int) for n in grid.size)
    assert grid.spacing == model_spacing
    assert grid.direction == orientation_direction("RAS")
    centre = grid.reference_image().TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in model_size])
    np.testing.assert_allclose(centre, foreground_center(fixed), atol=1e-6)
    # the cube's physical centre, too (voxels lo..hi inclusive are symmetric about their mean index)
    cube_centre = fixed.TransformContinuousIndexToPhysicalPoint([12.5, 17.5, 32.0])
    np.testing.assert_allclose(centre, cube_centre, atol=0.5 * min(fixed.GetSpacing()))


def test_model_grid_for_same_size_other_spacing_is_resampled(ras_volume: sitk.Image) -> None:
    grid, voxel_for_voxel = model_grid_for(ras_volume, (5, 6, 7), (1.0, 1.0, 1.0))
    assert voxel_for_voxel is False
    assert grid.spacing == (1.0, 1.0, 1.0)


def test_model_grid_for_other_size_same_spacing_is_resampled(ras_volume: sitk.Image) -> None:
    grid, voxel_for_voxel = model_grid_for(ras_volume, (6, 6, 6), (0.7, 1.3, 2.1))
    assert voxel_for_voxel is False
    assert grid.size == (6, 6, 6)


def _index_error(image: sitk.Image, found: np.ndarray, lo: tuple[int, ...], hi: tuple[int, ...]) -> np.ndarray:
    """Difference between a physical point and the centre of box lo..hi, in voxels of ``image`` per axis."""
    grid = ModelGrid.of(image)
    true_centre = (np.asarray(lo) + np.asarray(hi)) / 2.0
    found_index = np.linalg.solve(grid.index_to_physical_matrix(), found - np.asarray(grid.origin))
    return np.abs(found_index - true_centre)


@pytest.mark.parametrize(
    "direction",
    [tuple((_rotation((15.0, -25.0, 40.0)) @ np.diag([-1.0, 1.0, 1.0])).ravel()), PERMUTED_DIRECTION],
    ids=["rotated_flipped", "permuted"],
)
def test_foreground_center_of_bright_cube_on_noisy_background(direction: tuple[float, ...]) -> None:
    lo, hi = (4, 20, 9), (13, 27, 17)
    image = _cube_image(
        (30, 34, 24), lo, hi, (0.6, 1.4, 2.3), (10.0, -50.0, 80.0), direction,
        background=0.05, foreground=1.0, noise=0.05, seed=4,
    )
    found = foreground_center(image)
    assert found.shape == (3,)
    assert found.dtype == np.float64
    assert (_index_error(image, found, lo, hi) < 0.5).all()
    expected = image.TransformContinuousIndexToPhysicalPoint((np.asarray(lo) + np.asarray(hi)) / 2.0)
    assert np.linalg.norm(found - expected) < 0.5 * min(image.GetSpacing())


def test_foreground_center_of_ct_like_body_in_air() -> None:
    rng = np.random.default_rng(5)
    size, lo, hi = (36, 30, 26), (3, 8, 10), (20, 25, 22)
    array = -1000.0 + 15.0 * rng.standard_normal(size)  # air with noise
    array[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = rng.uniform(0.0, 100.0, (18, 18, 13))
    image = _image(array.astype(np.float32), (0.8, 0.8, 2.5), (100.0, 120.0, -40.0), RAS_DIRECTION)
    found = foreground_center(image)
    assert (_index_error(image, found, lo, hi) < 0.5).all()


def test_foreground_center_of_constant_image_is_image_centre() -> None:
    image = _image(np.zeros((5, 8, 9), dtype=np.float32), (1.0, 2.0, 3.0), (1.0, 2.0, 3.0), RAS_DIRECTION)
    found = foreground_center(image)
    np.testing.assert_allclose(found, image.TransformContinuousIndexToPhysicalPoint((2.0, 3.5, 4.0)), atol=1e-9)


# --------------------------------------------------------------------------- same_grid


def test_same_grid_true_for_identical_and_within_tolerance(ras_volume: sitk.Image) -> None:
    grid = ModelGrid.of(ras_volume)
    assert same_grid(ras_volume, ras_volume)
    assert same_grid(grid, ras_volume)
    assert same_grid(ras_volume, grid)
    assert same_grid(grid, grid)
    other = sitk.Image(ras_volume.GetSize(), sitk.sitkFloat32)  # pixel type does not matter
    other.SetSpacing([s + 1e-6 for s in ras_volume.GetSpacing()])
    other.SetOrigin([o - 1e-6 for o in ras_volume.GetOrigin()])
    other.SetDirection(ras_volume.GetDirection())
    assert same_grid(other, ras_volume)


@pytest.mark.parametrize(
    "change",
    [
        {"size": (5, 6, 8)},
        {"size": (6, 5, 7)},
        {"spacing": (0.7, 1.3, 2.2)},
        {"origin": (12.5, -4.0, 30.35)},
        {"direction": LPS_DIRECTION},
        {"direction": tuple((_rotation((0.0, 0.0, 1.0)) @ np.diag([-1.0, -1.0, 1.0])).ravel())},
    ],
    ids=["size_k", "size_swapped", "spacing", "origin", "direction_flip", "direction_1deg"],
)
def test_same_grid_false_when_anything_differs(ras_volume: sitk.Image, change: dict) -> None:
    base = ModelGrid.of(ras_volume)
    fields = {**base.__dict__, **change}
    other = ModelGrid(**fields)
    assert not same_grid(base, other)
    assert not same_grid(other.reference_image(), ras_volume)
