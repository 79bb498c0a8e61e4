"""``iirp.runtime.deformation``: model-grid voxel flow -> ITK displacement field (mm, LPS, fixed grid),
warping through it, and the folding fraction (conventions in ``iirp.runtime.geometry``)."""

from __future__ import annotations

import numpy as np
import pytest
from support import rotation as _rotation

sitk = pytest.importorskip("SimpleITK")

from iirp.runtime.deformation import (  # noqa: E402
    apply_field,
    displacement_field,
    flow_to_physical,
    folding_fraction,
    warp_on_model_grid,
)
from iirp.runtime.geometry import ModelGrid, array_from_image, image_from_array, orientation_direction  # noqa: E402

RAS_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
LPS_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FIELD_ATOL = 1e-9  # mm, float64 arithmetic on exact inputs
COMPOSE_ATOL = 1e-4  # mm, x + u(x) vs T(x + d(x))


# --------------------------------------------------------------------------- helpers


ROTATED_DIRECTION = tuple((_rotation((20.0, -35.0, 50.0)) @ np.diag([-1.0, 1.0, 1.0])).ravel())


def _field_array(field: sitk.Image) -> np.ndarray:
    """Vector image -> ``(X, Y, Z, 3)`` float64 in index order, via SimpleITK's own API."""
    return sitk.GetArrayFromImage(field).transpose(2, 1, 0, 3).astype(np.float64)


def _physical_points(grid: ModelGrid) -> np.ndarray:
    """``(X, Y, Z, 3)`` float64 physical position of every voxel centre of ``grid``."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in grid.size], indexing="ij"), axis=-1)
    return np.asarray(grid.origin) + index @ grid.index_to_physical_matrix().T


def _smooth_flow(shape: tuple[int, int, int], amplitude: float = 1.5, seed: int = 0) -> np.ndarray:
    """``(3, X, Y, Z)`` float32 smooth voxel flow (sums of low-frequency sines)."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float64) / n for n in shape], indexing="ij")
    flow = np.empty((3, *shape))
    for c in range(3):
        a, b, d, p = rng.uniform(0.5, 2.0, 4)
        flow[c] = amplitude * np.sin(2 * np.pi * (a * i + b * j + d * k) + p)
    return flow.astype(np.float32)


def _image(array: np.ndarray, grid: ModelGrid) -> sitk.Image:
    """``(X, Y, Z)`` array -> image on ``grid`` via SimpleITK's own API; keeps the numpy dtype."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    return image


def _constant_field(grid: ModelGrid, vector_mm: np.ndarray) -> sitk.Image:
    return image_from_array(np.broadcast_to(np.asarray(vector_mm, dtype=np.float64), (*grid.size, 3)).copy(), grid)


def _pre_alignment() -> sitk.AffineTransform:
    """Fixed -> moving affine with rotation, anisotropic scale, translation and a centre."""
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple((_rotation((6.0, -4.0, 9.0)) @ np.diag([1.05, 0.97, 1.02])).ravel()))
    transform.SetTranslation((3.5, -2.0, 4.25))
    transform.SetCenter((10.0, -5.0, 20.0))
    return transform


# --------------------------------------------------------------------------- flow_to_physical


@pytest.mark.parametrize(
    ("flow_vector", "expected_mm"),
    [((1.0, 0.0, 0.0), (-0.5, 0.0, 0.0)), ((0.0, 1.0, 0.0), (0.0, -2.0, 0.0)), ((0.0, 0.0, 1.0), (0.0, 0.0, 3.0))],
)
def test_flow_to_physical_on_ras_grid(flow_vector: tuple[float, ...], expected_mm: tuple[float, ...]) -> None:
    grid = ModelGrid((4, 5, 6), (0.5, 2.0, 3.0), (7.0, -3.0, 11.0), orientation_direction("RAS"))
    assert grid.direction == RAS_DIRECTION
    flow = np.broadcast_to(np.asarray(flow_vector, dtype=np.float32)[:, None, None, None], (3, 4, 5, 6)).copy()
    field = flow_to_physical(flow, grid)
    assert field.GetPixelID() == sitk.sitkVectorFloat64
    assert field.GetNumberOfComponentsPerPixel() == 3
    assert ModelGrid.of(field) == grid
    values = _field_array(field)
    assert values.shape == (4, 5, 6, 3)
    np.testing.assert_allclose(values, np.broadcast_to(expected_mm, values.shape), atol=FIELD_ATOL)


def test_flow_to_physical_with_rotated_direction_is_d_s_flow() -> None:
    spacing = (0.5, 2.0, 3.0)
    grid = ModelGrid((4, 5, 6), spacing, (1.0, 2.0, 3.0), ROTATED_DIRECTION)
    flow = np.random.default_rng(1).standard_normal((3, 4, 5, 6)).astype(np.float32)
    values = _field_array(flow_to_physical(flow, grid))
    matrix = np.asarray(ROTATED_DIRECTION).reshape(3, 3) @ np.diag(spacing)
    expected = np.einsum("pc,cxyz->xyzp", matrix, flow.astype(np.float64))
    np.testing.assert_allclose(values, expected, atol=FIELD_ATOL)
    # spot-check one voxel by hand, and against ITK's own index -> physical vector mapping
    np.testing.assert_allclose(values[1, 2, 3], matrix @ flow[:, 1, 2, 3], atol=FIELD_ATOL)
    ref = grid.reference_image()
    step = np.subtract(ref.TransformContinuousIndexToPhysicalPoint(flow[:, 1, 2, 3].astype(float)), ref.GetOrigin())
    np.testing.assert_allclose(values[1, 2, 3], step, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 5, 6), (2, 4, 5, 6), (3, 5, 4, 6), (1, 3, 4, 5, 6)])
def test_flow_to_physical_rejects_wrong_shape(shape: tuple[int, ...]) -> None:
    grid = ModelGrid((4, 5, 6), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), RAS_DIRECTION)
    with pytest.raises(ValueError, match=r"flow_to_physical\(\) 'flow' must have shape \(3, \(4, 5, 6\)\)"):
        flow_to_physical(np.zeros(shape, dtype=np.float32), grid)


# --------------------------------------------------------------------------- displacement_field


def test_displacement_field_on_model_grid_equals_flow_to_physical() -> None:
    grid = ModelGrid((6, 7, 8), (1.5, 1.0, 2.0), (-4.0, 9.0, 2.0), ROTATED_DIRECTION)
    flow = _smooth_flow(grid.size)
    fixed = grid.reference_image(sitk.sitkInt16)
    field = displacement_field(flow, grid, fixed)
    assert field.GetPixelID() == sitk.sitkVectorFloat64
    assert ModelGrid.of(field) == ModelGrid.of(fixed)
    np.testing.assert_allclose(_field_array(field), _field_array(flow_to_physical(flow, grid)), atol=FIELD_ATOL)


def test_displacement_field_on_finer_fixed_grid_interpolates_linearly() -> None:
    # model: 2 mm voxels; fixed: 1 mm voxels over the same region, same origin and direction,
    # so fixed voxel 2m is model voxel m and fixed voxel 2m+1 lies halfway between two model voxels.
    model = ModelGrid((6, 5, 7), (2.0, 2.0, 2.0), (10.0, -6.0, 3.0), RAS_DIRECTION)
    fixed_grid = ModelGrid((11, 9, 13), (1.0, 1.0, 1.0), model.origin, RAS_DIRECTION)
    flow = _smooth_flow(model.size, seed=2)
    model_mm = _field_array(flow_to_physical(flow, model))
    field = displacement_field(flow, model, fixed_grid.reference_image())
    assert ModelGrid.of(field) == fixed_grid
    values = _field_array(field)
    np.testing.assert_allclose(values[::2, ::2, ::2], model_mm, atol=1e-9)
    midpoints_i = 0.5 * (model_mm[:-1] + model_mm[1:])
    np.testing.assert_allclose(values[1::2, ::2, ::2], midpoints_i, atol=1e-9)
    midpoints_jk = 0.25 * (model_mm[:, :-1, :-1] + model_mm[:, 1:, :-1] + model_mm[:, :-1, 1:] + model_mm[:, 1:, 1:])
    np.testing.assert_allclose(values[::2, 1::2, 1::2], midpoints_jk, atol=1e-9)


def test_displacement_field_on_fixed_grid_with_other_direction() -> None:
    # fixed stored LPS and anisotropic, model RAS: the field is a physical (LPS mm) quantity,
    # so at a fixed voxel that coincides with a model voxel it is the model vector, not a flipped one.
    model = ModelGrid((6, 6, 6), (2.0, 2.0, 2.0), (10.0, 10.0, 0.0), RAS_DIRECTION)
    # model voxel (5, 5, 0) is at (0, 0, 0); fixed LPS voxel (i, j, k) at (i, j, 2k) mm
    fixed_grid = ModelGrid((11, 11, 6), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), LPS_DIRECTION)
    flow = _smooth_flow(model.size, seed=3)
    model_mm = _field_array(flow_to_physical(flow, model))
    values = _field_array(displacement_field(flow, model, fixed_grid.reference_image()))
    for m in [(5, 5, 0), (0, 0, 0), (2, 3, 4), (4, 1, 5)]:
        f = (2 * (5 - m[0]), 2 * (5 - m[1]), m[2])
        np.testing.assert_allclose(values[f], model_mm[m], atol=1e-9)


def test_displacement_field_is_zero_outside_model_grid() -> None:
    model = ModelGrid((5, 5, 5), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), LPS_DIRECTION)  # covers 0..8 mm
    fixed_grid = ModelGrid((20, 20, 20), (1.0, 1.0, 1.0), (-6.0, -6.0, -6.0), LPS_DIRECTION)  # -6..13 mm
    flow = np.full((3, 5, 5, 5), 0.75, dtype=np.float32)
    values = _field_array(displacement_field(flow, model, fixed_grid.reference_image()))
    points = _physical_points(fixed_grid)
    inside = ((points >= 0.0) & (points <= 8.0)).all(axis=-1)
    # further than one model voxel from the model grid: nothing but zeros
    far = ((points < -2.0) | (points > 10.0)).any(axis=-1)
    assert far.sum() > 0 and inside.sum() == 9**3
    np.testing.assert_array_equal(values[far], 0.0)
    np.testing.assert_allclose(values[inside], np.broadcast_to([1.5, 1.5, 1.5], (9**3, 3)), atol=1e-9)


@pytest.mark.parametrize("fixed_on_model_grid", [True, False], ids=["fixed_is_model_grid", "finer_fixed_grid"])
def test_displacement_field_composes_pre_alignment_after_deformation(fixed_on_model_grid: bool) -> None:
    model = ModelGrid((8, 7, 9), (2.0, 1.5, 2.5), (12.0, 3.0, -7.0), RAS_DIRECTION)
    if fixed_on_model_grid:
        fixed_grid, step = model, 1
    else:
        fixed_grid = ModelGrid((15, 13, 17), (1.0, 0.75, 1.25), model.origin, RAS_DIRECTION)
        step = 2  # fixed voxel 2m coincides with model voxel m
    flow = _smooth_flow(model.size, seed=4)
    d = _field_array(flow_to_physical(flow, model))  # deformable part at model voxels, mm
    transform = _pre_alignment()
    fixed = fixed_grid.reference_image()
    field = displacement_field(flow, model, fixed, transform)
    assert field.GetPixelID() == sitk.sitkVectorFloat64
    assert ModelGrid.of(field) == fixed_grid
    u = _field_array(field)
    for m in [(0, 0, 0), (7, 6, 8), (3, 2, 5), (5, 4, 1), (1, 6, 7)]:
        f = tuple(step * c for c in m)
        x = np.asarray(fixed.TransformIndexToPhysicalPoint(f))
        expected = np.asarray(transform.TransformPoint(tuple(x + d[m])))
        np.testing.assert_allclose(x + u[f], expected, atol=COMPOSE_ATOL)


def test_displacement_field_outside_model_grid_is_pre_alignment_only() -> None:
    model = ModelGrid((5, 5, 5), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), LPS_DIRECTION)
    fixed_grid = ModelGrid((12, 12, 12), (2.0, 2.0, 2.0), (-6.0, -6.0, -6.0), LPS_DIRECTION)
    flow = np.full((3, 5, 5, 5), 1.0, dtype=np.float32)
    transform = _pre_alignment()
    fixed = fixed_grid.reference_image()
    u = _field_array(displacement_field(flow, model, fixed, transform))
    for f in [(0, 0, 0), (11, 11, 11), (0, 5, 11), (11, 0, 3)]:
        x = np.asarray(fixed.TransformIndexToPhysicalPoint(f))
        np.testing.assert_allclose(x + u[f], transform.TransformPoint(tuple(x)), atol=COMPOSE_ATOL)
    # inside: deformation of 2 mm on every axis, then T
    f = (5, 6, 7)
    x = np.asarray(fixed.TransformIndexToPhysicalPoint(f))
    np.testing.assert_allclose(x + u[f], transform.TransformPoint(tuple(x + 2.0)), atol=COMPOSE_ATOL)


def test_displacement_field_zero_flow_with_pre_alignment_is_the_affine_field() -> None:
    grid = ModelGrid((6, 6, 6), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), RAS_DIRECTION)
    transform = _pre_alignment()
    u = _field_array(displacement_field(np.zeros((3, 6, 6, 6), np.float32), grid, grid.reference_image(), transform))
    points = _physical_points(grid)
    expected = np.asarray([transform.TransformPoint(tuple(p)) for p in points.reshape(-1, 3)]).reshape(points.shape)
    np.testing.assert_allclose(points + u, expected, atol=COMPOSE_ATOL)


# --------------------------------------------------------------------------- apply_field


@pytest.fixture()
def moving_grid() -> ModelGrid:
    return ModelGrid((12, 10, 8), (2.0, 1.0, 1.5), (5.0, -8.0, 20.0), ROTATED_DIRECTION)


def _smooth_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    return (10.0 + rng.uniform(1, 3) * i + rng.uniform(1, 3) * j * j / 4 + rng.uniform(1, 3) * np.cos(k)).astype(
        np.float32
    )


def test_apply_field_zero_field_reproduces_moving(moving_grid: ModelGrid) -> None:
    moving = _image(_smooth_volume(moving_grid.size), moving_grid)
    field = _constant_field(moving_grid, np.zeros(3))
    warped = apply_field(moving, moving_grid.reference_image(), field)
    assert warped.GetPixelID() == sitk.sitkFloat32
    assert ModelGrid.of(warped) == moving_grid
    np.testing.assert_allclose(array_from_image(warped), array_from_image(moving), rtol=1e-6, atol=1e-5)


def test_apply_field_accepts_float32_field(moving_grid: ModelGrid) -> None:
    moving = _image(_smooth_volume(moving_grid.size), moving_grid)
    field = sitk.Cast(_constant_field(moving_grid, np.zeros(3)), sitk.sitkVectorFloat32)
    warped = apply_field(moving, moving_grid.reference_image(), field)
    np.testing.assert_allclose(array_from_image(warped), array_from_image(moving), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_apply_field_constant_one_voxel_field_shifts_by_one_voxel(moving_grid: ModelGrid, axis: int) -> None:
    # u = one voxel step along index axis ``axis`` in mm: warped(x) = moving(x + u) = moving at index + e_axis
    volume = _smooth_volume(moving_grid.size, seed=axis)
    moving = _image(volume, moving_grid)
    step_mm = moving_grid.index_to_physical_matrix()[:, axis]
    warped = array_from_image(apply_field(moving, moving_grid.reference_image(), _constant_field(moving_grid, step_mm)))
    n = moving_grid.size[axis]
    inner = np.take(warped, np.arange(n - 1), axis=axis)
    np.testing.assert_allclose(inner, np.take(volume, np.arange(1, n), axis=axis), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.take(warped, [n - 1], axis=axis), 0.0)  # sampled outside: zero


def test_apply_field_onto_other_fixed_grid(moving_grid: ModelGrid) -> None:
    # fixed = moving's grid shifted by one voxel along i; a field of that shift brings the moving image back
    step_mm = moving_grid.index_to_physical_matrix()[:, 0]
    fixed_grid = ModelGrid(moving_grid.size, moving_grid.spacing, tuple(np.add(moving_grid.origin, -step_mm)),
                           moving_grid.direction)
    volume = _smooth_volume(moving_grid.size, seed=7)
    moving = _image(volume, moving_grid)
    warped = array_from_image(apply_field(moving, fixed_grid.reference_image(), _constant_field(fixed_grid, step_mm)))
    assert warped.shape == fixed_grid.size
    np.testing.assert_allclose(warped, volume, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("numpy_dtype", "pixel_id"), [(np.int16, sitk.sitkInt16), (np.uint8, sitk.sitkUInt8)])
def test_apply_field_labels_keep_pixel_type_and_label_set(
    moving_grid: ModelGrid, numpy_dtype: type, pixel_id: int
) -> None:
    rng = np.random.default_rng(8)
    labels = np.zeros(moving_grid.size, dtype=numpy_dtype)
    labels[2:6, 2:8, 1:5] = 3
    labels[6:11, 1:6, 3:7] = 17
    labels[1:4, 6:9, 5:8] = 200
    moving = _image(labels, moving_grid)
    assert moving.GetPixelID() == pixel_id
    fixed = moving_grid.reference_image()
    # identity: exactly the same labels
    same = apply_field(moving, fixed, _constant_field(moving_grid, np.zeros(3)), labels=True)
    assert same.GetPixelID() == pixel_id
    np.testing.assert_array_equal(array_from_image(same, dtype=None), labels)
    # a smooth non-trivial field: nearest neighbour, so only existing labels (and 0 outside)
    u = 1.7 * rng.standard_normal((1, 1, 1, 3)) + 0.8 * np.sin(_physical_points(moving_grid) / 5.0)
    warped = apply_field(moving, fixed, image_from_array(u, moving_grid), labels=True)
    assert warped.GetPixelID() == pixel_id
    values = array_from_image(warped, dtype=None)
    assert values.dtype == numpy_dtype
    assert set(np.unique(values)) <= {0, 3, 17, 200}
    assert {3, 17, 200} & set(np.unique(values))


# --------------------------------------------------------------------------- warp_on_model_grid


MODEL_GRID = ModelGrid((14, 12, 10), (1.0, 1.0, 1.0), (30.0, -20.0, 5.0), RAS_DIRECTION)


@pytest.mark.parametrize("stored_as", ["RAS", "LPS", "PIL"])
def test_warp_on_model_grid_equals_itk_through_the_field(stored_as: str) -> None:
    # images on the model grid, possibly stored in another axis order (a lossless reorientation of it): the
    # kernels give what ITK gives through the displacement field, edges included
    flow = _smooth_flow(MODEL_GRID.size, amplitude=2.0, seed=3)
    volume = _smooth_volume(MODEL_GRID.size, seed=4)
    moving = sitk.DICOMOrient(_image(volume, MODEL_GRID), stored_as)
    fixed = sitk.DICOMOrient(MODEL_GRID.reference_image(), stored_as)
    fast = warp_on_model_grid(moving, flow, MODEL_GRID, fixed)
    assert fast is not None
    assert ModelGrid.of(fast) == ModelGrid.of(fixed)
    assert fast.GetPixelID() == sitk.sitkFloat32
    slow = apply_field(moving, fixed, displacement_field(flow, MODEL_GRID, fixed, None))
    assert 0.05 < np.mean(array_from_image(slow) == 0) < 0.5  # some points fall outside
    np.testing.assert_allclose(array_from_image(fast), array_from_image(slow), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.int32])
def test_warp_on_model_grid_labels_equal_itk_nearest(dtype: type) -> None:
    rng = np.random.default_rng(5)
    flow = _smooth_flow(MODEL_GRID.size, amplitude=2.5, seed=6)
    labels = rng.integers(0, 50, MODEL_GRID.size).astype(dtype)
    moving = sitk.DICOMOrient(_image(labels, MODEL_GRID), "LPI")
    fixed = MODEL_GRID.reference_image()
    fast = warp_on_model_grid(moving, flow, MODEL_GRID, fixed, labels=True)
    assert fast is not None and fast.GetPixelID() == moving.GetPixelID()
    slow = apply_field(moving, fixed, displacement_field(flow, MODEL_GRID, fixed, None), labels=True)
    np.testing.assert_array_equal(array_from_image(fast, dtype=None), array_from_image(slow, dtype=None))


def test_warp_on_model_grid_declines_off_grid_inputs() -> None:
    flow = _smooth_flow(MODEL_GRID.size, seed=1)
    volume = _smooth_volume(MODEL_GRID.size)
    fixed = MODEL_GRID.reference_image()
    shifted = ModelGrid(MODEL_GRID.size, MODEL_GRID.spacing, (30.5, -20.0, 5.0), MODEL_GRID.direction)
    finer = ModelGrid((28, 12, 10), (0.5, 1.0, 1.0), MODEL_GRID.origin, MODEL_GRID.direction)
    assert warp_on_model_grid(_image(volume, shifted), flow, MODEL_GRID, fixed) is None  # moving off the grid
    assert warp_on_model_grid(_image(volume, MODEL_GRID), flow, MODEL_GRID, finer.reference_image()) is None
    float_labels = _image(volume, MODEL_GRID)
    assert warp_on_model_grid(float_labels, flow, MODEL_GRID, fixed, labels=True) is None  # not integer labels


# --------------------------------------------------------------------------- folding_fraction


@pytest.mark.parametrize("direction", [LPS_DIRECTION, RAS_DIRECTION, ROTATED_DIRECTION], ids=["lps", "ras", "rotated"])
def test_folding_fraction_identity_field_is_zero(direction: tuple[float, ...]) -> None:
    grid = ModelGrid((10, 9, 8), (1.0, 2.0, 1.5), (0.0, 0.0, 0.0), direction)
    assert folding_fraction(_constant_field(grid, np.zeros(3))) == 0.0
    assert folding_fraction(_constant_field(grid, np.array([3.0, -2.0, 1.0]))) == 0.0


def test_folding_fraction_local_inversion_counts_that_region() -> None:
    n, lo, hi = 20, 6, 13  # region: voxels 6..13 on every axis (8^3 of 20^3)
    grid = ModelGrid((n, n, n), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), LPS_DIRECTION)
    points = _physical_points(grid)
    centre = np.full(3, (lo + hi) / 2.0)
    region = ((points >= lo) & (points <= hi)).all(axis=-1)
    u = np.where(region[..., None], -2.0 * (points - centre), 0.0)  # x + u(x) = -(x - c) + c inside
    fraction = folding_fraction(image_from_array(u, grid))
    assert isinstance(fraction, float)
    interior = ((points >= lo + 1) & (points <= hi - 1)).all(axis=-1).mean()
    dilated = ((points >= lo - 1) & (points <= hi + 1)).all(axis=-1).mean()
    assert interior <= fraction <= dilated
    assert fraction == pytest.approx(region.mean(), rel=0.5)


def _affine_field(grid: ModelGrid, gradient: np.ndarray) -> sitk.Image:
    """Field u(x) = G (x - c) in mm on ``grid``; x -> x + u(x) has the constant Jacobian I + G everywhere."""
    points = _physical_points(grid)
    centre = points.reshape(-1, 3).mean(axis=0)
    return image_from_array((points - centre) @ gradient.T, grid)


@pytest.mark.parametrize("direction", [LPS_DIRECTION, RAS_DIRECTION, ROTATED_DIRECTION], ids=["lps", "ras", "rotated"])
@pytest.mark.parametrize(
    ("gradient", "folded"),
    [
        (np.diag([-2.0, 0.0, 0.0]), True),  # physical mirror along x: det(I + G) = -1
        (np.diag([2.0, 0.0, 0.0]), False),  # stretch by 3 along x: det = 3
        (np.diag([-0.5, 0.3, 0.0]), False),  # mild compression / stretch: det = 0.65
        (np.array([[0.0, 1.5, 0.0], [-1.5, 0.0, 0.0], [0.0, 0.0, 0.0]]), False),  # det = 1 + 2.25
        (np.diag([-3.0, -3.0, 0.0]), False),  # point reflection in the xy-plane: det = +4, orientation kept
    ],
    ids=["mirror_x", "stretch_x", "mild", "shear_rotation", "reflect_xy"],
)
def test_folding_fraction_uses_physical_jacobian(
    direction: tuple[float, ...], gradient: np.ndarray, folded: bool
) -> None:
    """The Jacobian of x -> x + u(x) is a physical quantity: it must not depend on how the grid is stored.

    The field is built in physical (LPS mm) coordinates, so ``det(I + G)`` is the same on every grid.
    """
    grid = ModelGrid((8, 8, 8), (1.0, 1.5, 2.0), (0.0, 0.0, 0.0), direction)
    assert np.sign(np.linalg.det(np.eye(3) + gradient)) == (-1.0 if folded else 1.0)
    fraction = folding_fraction(_affine_field(grid, gradient))
    # every voxel has the same Jacobian; one-sided differences on the border may tip a few voxels
    if folded:
        assert fraction > 0.9
    else:
        assert fraction < 0.1
