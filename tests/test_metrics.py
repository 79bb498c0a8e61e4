"""iirp.metrics against brute force and SimpleITK's own filters."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from iirp.metrics import (
    dice_arrays,
    hd95,
    image_similarity,
    jacobian_stats,
    label_dice,
    mean_dice_arrays,
    pair_metrics,
    shared_labels,
)
from iirp.runtime.deformation import jacobian_determinant

SPACING = (1.5, 1.0, 2.0)  # (x, y, z) mm


def _image(array: np.ndarray, spacing: tuple[float, float, float] = SPACING) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    return image


@pytest.fixture
def two_maps() -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping int16 label maps (numpy z, y, x) with labels 1, 2 (and 5 only in the first)."""
    a = np.zeros((20, 24, 28), np.int16)
    b = np.zeros_like(a)
    a[5:14, 6:17, 4:20] = 1
    a[2:4, 2:4, 2:4] = 1  # a detached island: the outlier HD95 ignores and HD100 does not
    b[7:15, 5:18, 8:22] = 1
    a[15:19, 10:20, 10:20] = 2
    b[14:19, 11:20, 9:19] = 2
    a[0:2, 20:24, 0:3] = 5
    return a, b


def _brute_force_surface_distances(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    def surface(mask: np.ndarray) -> np.ndarray:
        contour = sitk.LabelContour(sitk.GetImageFromArray(mask.astype(np.uint8)), fullyConnected=True)
        return np.argwhere(sitk.GetArrayFromImage(contour) > 0)

    sa, sb = surface(a), surface(b)
    scale = np.array(SPACING[::-1])
    d = np.sqrt((((sa[:, None, :] - sb[None, :, :]) * scale) ** 2).sum(-1))
    return d.min(axis=1), d.min(axis=0)


def test_dice_numpy_twin_matches_simpleitk(two_maps) -> None:
    a, b = two_maps
    labels = [1, 2]
    per_label = label_dice(_image(a), _image(b), labels)
    assert per_label[1] == pytest.approx(2 * np.sum((a == 1) & (b == 1)) / (np.sum(a == 1) + np.sum(b == 1)))
    assert mean_dice_arrays(a, b, labels) == pytest.approx(np.mean(list(per_label.values())), abs=1e-12)
    assert label_dice(_image(a), _image(a), [1, 2, 5]) == {1: 1.0, 2: 1.0, 5: 1.0}
    assert list(shared_labels(a, b)) == [1, 2]


def test_dice_rejects_mismatch() -> None:
    with pytest.raises(ValueError, match=r"mean_dice_arrays\(\): shapes differ"):
        mean_dice_arrays(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), [1])
    with pytest.raises(ValueError, match="no label of 'labels' is present"):
        mean_dice_arrays(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), [1])


def test_hd95_matches_brute_force_and_simpleitk_hausdorff(two_maps) -> None:
    a, b = two_maps
    d_ab, d_ba = _brute_force_surface_distances(a == 1, b == 1)
    expected95 = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    assert hd95(_image(a), _image(b), [1])[1] == pytest.approx(expected95, rel=1e-5)
    # at the 100th percentile it is the Hausdorff distance, which SimpleITK computes on its own
    hausdorff = sitk.HausdorffDistanceImageFilter()
    hausdorff.Execute(_image((a == 1).astype(np.uint8)), _image((b == 1).astype(np.uint8)))
    assert hd95(_image(a), _image(b), [1], percentile=100)[1] == pytest.approx(
        hausdorff.GetHausdorffDistance(), rel=1e-5)
    assert np.isnan(hd95(_image(a), _image(b), [5])[5])  # label 5 is missing from b


def _field(vectors_xyz: np.ndarray) -> sitk.Image:
    """A displacement field from a numpy (z, y, x, 3) array, identity direction, SPACING."""
    field = sitk.GetImageFromArray(vectors_xyz.astype(np.float64), isVector=True)
    field.SetSpacing(SPACING)
    return field


def test_jacobian_stats_of_known_fields() -> None:
    shape = (12, 14, 16)
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    points = np.stack([xx * SPACING[0], yy * SPACING[1], zz * SPACING[2]], axis=-1)  # mm
    scaling = _field(0.1 * points)  # x -> 1.1 x: det J = 1.331 (inside; ITK's border derivatives are one-sided)
    det = sitk.GetArrayFromImage(jacobian_determinant(scaling))
    np.testing.assert_allclose(det[1:-1, 1:-1, 1:-1], 1.331, rtol=1e-9)
    folding, sdlogj = jacobian_stats(scaling)
    assert folding == 0.0 and sdlogj == pytest.approx(np.log(det).std(), rel=1e-12)
    folding, _ = jacobian_stats(_field(-2.0 * points))  # x -> -x: det J = -1, all folded
    assert folding == 1.0


def test_image_similarity() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((6, 7, 8))
    assert image_similarity(a, a) == (0.0, pytest.approx(1.0))
    mse, ncc = image_similarity(a, 2 * a + 1)
    assert ncc == pytest.approx(1.0) and mse == pytest.approx(np.mean((a + 1) ** 2))
    with pytest.raises(ValueError, match="shapes differ"):
        image_similarity(a, a[:-1])


def test_pair_metrics_of_an_identity_result(two_maps) -> None:
    a, _ = two_maps
    image = np.random.default_rng(1).random(a.shape)
    metrics = pair_metrics(_image(a), _image(a), _field(np.zeros((*a.shape, 3))), image, image)
    assert metrics.dice == 1.0 and metrics.hd95_mm == 0.0 and metrics.hd95_missing == 0
    assert metrics.folding_fraction == 0.0 and metrics.mse == 0.0
    assert set(metrics.dice_per_label) == {1, 2, 5}
    with pytest.raises(ValueError, match="no label to score"):
        pair_metrics(_image(a), _image(a), _field(np.zeros((*a.shape, 3))), image, image, labels=[])


def test_dice_arrays_defaults_to_the_reference_labels() -> None:
    reference = np.array([[0, 1, 1, 2]])
    candidate = np.array([[1, 1, 0, 2]])
    assert dice_arrays(reference, candidate) == {1: 0.5, 2: 1.0}
    assert dice_arrays(reference, candidate, [3]) == {}  # absent from both: not scored
    with pytest.raises(ValueError, match=r"dice_arrays\(\): shapes differ"):
        dice_arrays(reference, candidate[:, :3])
