"""Synthetic pairs (iirp.synthetic): the true flow maps moving onto fixed, folding-free, seeded."""

from __future__ import annotations

import numpy as np
import pytest

from iirp.kernels import warp
from iirp.synthetic import (
    endpoint_error,
    jacobian_determinant,
    make_pair,
    random_flow,
    random_intensity,
    warp_labels,
)

SHAPE = (24, 32, 24)  # anisotropic: a swapped axis shows up as a shape error


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    """A smooth [0, 1] volume: a sum of Gaussian blobs."""
    axes = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij")
    vol = np.zeros(SHAPE)
    for centre, sigma in (((8, 10, 9), 4.0), ((15, 20, 14), 3.0), ((12, 16, 8), 2.5)):
        vol += np.exp(-sum((a - c) ** 2 for a, c in zip(axes, centre)) / (2 * sigma**2))
    return (vol / vol.max()).astype(np.float32)


def test_random_flow_is_smooth_bounded_folding_free_and_seeded() -> None:
    flow = random_flow(SHAPE, 3, max_displacement=3.0, control_spacing=8.0)
    assert flow.shape == (3, *SHAPE) and flow.dtype == np.float32
    assert np.abs(flow).max() <= 3.0 + 1e-5
    assert np.abs(flow).max() > 0.5  # not trivially zero
    assert jacobian_determinant(flow).min() > 0
    np.testing.assert_array_equal(flow, random_flow(SHAPE, 3, max_displacement=3.0, control_spacing=8.0))
    assert not np.array_equal(flow, random_flow(SHAPE, 4, max_displacement=3.0, control_spacing=8.0))


def test_large_bound_is_clipped_to_folding_free() -> None:
    flow = random_flow(SHAPE, 0, max_displacement=100.0, control_spacing=8.0)
    assert np.abs(flow).max() <= 0.4 * 8.0 * 1.01  # FOLDING_FREE_RATIO x the (slightly smaller) spacing
    assert jacobian_determinant(flow).min() > 0


def test_jacobian_of_analytic_flows() -> None:
    np.testing.assert_allclose(jacobian_determinant(np.zeros((3, *SHAPE), np.float32)), 1.0)
    scale = np.zeros((3, *SHAPE), np.float32)
    scale[0] = 0.5 * np.arange(SHAPE[0])[:, None, None]  # x -> 1.5 x
    np.testing.assert_allclose(jacobian_determinant(scale), 1.5)


def test_true_flow_maps_moving_onto_fixed(volume: np.ndarray) -> None:
    pair = make_pair(volume, 7, max_displacement=3.0, control_spacing=8.0, intensity=False)
    assert pair.fixed.shape == pair.moving.shape == SHAPE and pair.flow.shape == (3, *SHAPE)
    inner = (slice(4, -4),) * 3
    before = np.abs(pair.moving - pair.fixed)[inner].mean()
    after = np.abs(warp(pair.moving, pair.flow) - pair.fixed)[inner].mean()
    assert after < 0.1 * before, (after, before)
    assert after < 5e-3  # the base deformation is interpolated twice


def test_without_base_deformation_registration_is_exact(volume: np.ndarray) -> None:
    pair = make_pair(volume, 7, max_displacement=3.0, base_displacement=0.0, intensity=False)
    np.testing.assert_array_equal(pair.moving, volume)
    np.testing.assert_array_equal(warp(pair.moving, pair.flow), pair.fixed)


def test_pair_is_reproducible_and_carries_labels(volume: np.ndarray) -> None:
    labels = (volume > 0.3).astype(np.uint8) + (volume > 0.6).astype(np.uint8)
    a = make_pair(volume, 11, labels=labels)
    b = make_pair(volume, 11, labels=labels)
    for name in ("fixed", "moving", "flow", "fixed_labels", "moving_labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.fixed_labels.dtype == np.uint8 and set(np.unique(a.fixed_labels)) <= {0, 1, 2}
    assert 0.0 <= a.fixed.min() and a.fixed.max() <= 1.0 and a.fixed.dtype == np.float32
    # the labels follow the same flow: warping the moving labels by the truth gives the fixed labels
    agree = (warp_labels(a.moving_labels, a.flow) == a.fixed_labels).mean()
    assert agree > 0.97


def test_warp_labels_shifts_by_whole_voxels() -> None:
    labels = np.zeros(SHAPE, np.int16)
    labels[10, 12, 8] = 5
    flow = np.zeros((3, *SHAPE), np.float32)
    flow[1] = 2.0  # sample 2 voxels along axis 1
    out = warp_labels(labels, flow)
    assert out[10, 10, 8] == 5 and out.sum() == 5 and out.dtype == np.int16
    assert (out[:, -2:, :] == 0).all()  # outside is 0


def test_random_intensity_stays_in_range(volume: np.ndarray) -> None:
    out = random_intensity(volume, 1)
    assert out.dtype == np.float32 and out.shape == SHAPE and 0 <= out.min() and out.max() <= 1
    assert not np.array_equal(out, volume)
    np.testing.assert_array_equal(out, random_intensity(volume, 1))


def test_endpoint_error_units() -> None:
    truth = np.zeros((3, *SHAPE), np.float32)
    estimate = truth.copy()
    estimate[0] = 1.0  # one voxel along axis 0
    mask = np.zeros(SHAPE, bool)
    mask[2:5, 2:5, 2:5] = True
    epe = endpoint_error(estimate, truth, spacing=(2.5, 1.0, 1.0), mask=mask)
    assert epe["voxels"] == pytest.approx(1.0) and epe["mm"] == pytest.approx(2.5)
    with pytest.raises(ValueError, match="'mask' must be a non-empty"):
        endpoint_error(estimate, truth, mask=np.zeros(SHAPE, bool))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"random_flow\(\) 'shape' must be 3 extents"):
        random_flow((8, 8), 0)
    with pytest.raises(ValueError, match="'control_spacing' must be >= 2"):
        random_flow(SHAPE, 0, control_spacing=1)
    with pytest.raises(ValueError, match=r"make_pair\(\) 'volume' must be \(X, Y, Z\)"):
        make_pair(np.zeros((4, 4)), 0)
    with pytest.raises(ValueError, match="'labels' must have the volume's shape"):
        make_pair(np.zeros(SHAPE), 0, labels=np.zeros((2, 2, 2), np.uint8))
