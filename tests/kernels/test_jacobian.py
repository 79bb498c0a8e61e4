"""The numba Jacobian determinant (:mod:`iirp.kernels.jacobian`) against SimpleITK's filter on the field
``iirp-run`` writes (:func:`iirp.runtime.deformation.jacobian_determinant` of :func:`displacement_field`)."""

from __future__ import annotations

import numpy as np
import pytest

from iirp.kernels.jacobian import folding_count, jacobian_determinant

sitk = pytest.importorskip("SimpleITK")

from iirp.runtime import deformation  # noqa: E402
from iirp.runtime.geometry import ModelGrid, array_from_image, orientation_direction  # noqa: E402


def _folding_flow(shape: tuple[int, int, int], seed: int, amplitude: float) -> np.ndarray:
    """Smooth flow plus local noise strong enough to fold some voxels."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float64) / n for n in shape], indexing="ij")
    flow = np.stack([amplitude * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * i + rng.uniform(0.5, 2) * j + k))
                     for _ in range(3)])
    return (flow + rng.normal(0, 0.4, flow.shape)).astype(np.float32)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 1.5)])
@pytest.mark.parametrize("code", ["RAS", "LPS"])
def test_matches_simpleitk_on_the_written_field(spacing: tuple[float, float, float], code: str) -> None:
    grid = ModelGrid((14, 12, 10), spacing, (3.0, -7.0, 11.0), orientation_direction(code))
    flow = _folding_flow(grid.size, seed=1, amplitude=1.5)
    field = deformation.displacement_field(flow, grid, grid.reference_image(), None)
    itk = array_from_image(deformation.jacobian_determinant(field), dtype=np.float64)
    ours = jacobian_determinant(flow, spacing)
    np.testing.assert_allclose(ours, itk, rtol=1e-5, atol=1e-5)  # ITK computes in float32
    assert 0.01 < np.mean(ours <= 0) < 0.5  # the case is not trivial
    ambiguous = np.abs(itk) < 1e-4  # where float32 and float64 may disagree on the sign
    assert np.array_equal((ours <= 0)[~ambiguous], (itk <= 0)[~ambiguous])
    count = folding_count(flow, spacing)
    assert count == int(np.count_nonzero(ours <= 0))
    assert abs(count / ours.size - deformation.folding_fraction(field)) <= ambiguous.mean()


def test_folding_fraction_of_flow_on_a_reoriented_fixed_grid() -> None:
    grid = ModelGrid((12, 10, 9), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), orientation_direction("RAS"))
    flow = _folding_flow(grid.size, seed=2, amplitude=1.2)
    fixed = sitk.DICOMOrient(grid.reference_image(), "PIL")  # the fixed image stored in another axis order
    assert deformation.is_reoriented_grid(grid, fixed)
    field = deformation.displacement_field(flow, grid, fixed, None)
    assert deformation.folding_fraction_of_flow(flow, grid) == pytest.approx(deformation.folding_fraction(field),
                                                                             abs=2.0 / flow[0].size)
    shifted = ModelGrid(grid.size, grid.spacing, (0.5, 0.0, 0.0), grid.direction)
    assert not deformation.is_reoriented_grid(grid, shifted.reference_image())


def test_identity_and_scaling_by_hand() -> None:
    zero = np.zeros((3, 5, 4, 3), np.float32)
    np.testing.assert_array_equal(jacobian_determinant(zero), 1.0)
    x = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((5, 4, 3), np.float32)
    stretch = zero.copy()
    stretch[0] = 0.5 * x  # x -> 1.5 x: determinant 1.5 inside, 1.25 at the two faces (one-sided, halved)
    det = jacobian_determinant(stretch)
    np.testing.assert_allclose(det[1:-1], 1.5)
    np.testing.assert_allclose(det[[0, -1]], 1.25)
    fold = zero.copy()
    fold[0] = -2.0 * x  # x -> -x: determinant -1 inside, 0 at the two faces: every voxel counts
    np.testing.assert_allclose(jacobian_determinant(fold)[[0, 2, 4], 0, 0], [0.0, -1.0, 0.0])
    assert folding_count(fold) == 5 * 4 * 3
    nan = zero.copy()
    nan[1, 2, 2, 1] = np.nan
    assert folding_count(nan) == 6  # its six neighbours read it; the voxel itself does not


def test_argument_checks() -> None:
    with pytest.raises(ValueError, match=r"'flow' must have shape \(3, X, Y, Z\), got \(2, 4, 4, 4\)"):
        jacobian_determinant(np.zeros((2, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"'spacing' must be 3 positive numbers"):
        jacobian_determinant(np.zeros((3, 4, 4, 4), np.float32), (1.0, 0.0, 1.0))
