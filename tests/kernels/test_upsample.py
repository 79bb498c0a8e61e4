"""CPU (numba) flow upsampling of :mod:`iirp.kernels` against analytic cases and ``F.interpolate``.

``up_s(u) = s * trilinear_resize(u, s x, align_corners=True)``: output index p
on an axis of N = s n voxels reads the input at ``p (n - 1) / (N - 1)``, and the
vectors are scaled by s (see :mod:`iirp.runtime.geometry`).
"""

from __future__ import annotations

import numpy as np
import pytest

from iirp.kernels import upsample, upsample2

#: float32 blending vs PyTorch's float32 kernel, which contracts the blend into FMAs: agreement to a
#: few ulps of the largest value blended, so the tolerance is relative to the field's magnitude.
FIELD_RTOL = 1e-6


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=0, atol=FIELD_RTOL * max(float(np.abs(expected).max()), 1.0))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(99)


def _torch_upsample(flow: np.ndarray, factor: int) -> np.ndarray:
    torch = pytest.importorskip("torch")
    from torch.nn import functional as F

    size = tuple(factor * n for n in flow.shape[1:])
    resized = F.interpolate(torch.from_numpy(flow)[None], size=size, mode="trilinear", align_corners=True)
    return (resized * factor)[0].numpy()


@pytest.mark.parametrize("factor", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("coarse", [(5, 6, 3), (2, 1, 4)])
def test_matches_interpolate(rng: np.random.Generator, factor: int, coarse: tuple[int, int, int]) -> None:
    flow = (rng.standard_normal((3, *coarse)) * 4.0).astype(np.float32)
    out = upsample(flow, factor)
    assert out.shape == (3, *(factor * n for n in coarse)) and out.dtype == np.float32 and out.flags.c_contiguous
    _assert_close(out, _torch_upsample(flow, factor))


def test_matches_spatial_upsample_flow(rng: np.random.Generator) -> None:
    torch = pytest.importorskip("torch")
    from iirp.model import spatial

    flow = (rng.standard_normal((3, 8, 4, 12)) * 2.0).astype(np.float32)
    ref = spatial.upsample_flow(torch.from_numpy(flow)[None], (16, 8, 24))[0].numpy()
    _assert_close(upsample2(flow), ref)


def test_factor_one_is_a_copy(rng: np.random.Generator) -> None:
    flow = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    out = upsample(flow, 1)
    np.testing.assert_array_equal(out, flow)
    assert not np.shares_memory(out, flow)


def test_linear_flow_is_reproduced_and_scaled() -> None:
    """u(i) = a i + b j + c k + d on the coarse grid is linear in the fine index after resizing."""
    coarse, factor = (4, 5, 3), 4
    a = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in coarse], indexing="ij")
    flow = np.stack([0.5 * a[0] - 1.0, 0.25 * a[1] + 0.5 * a[2], -a[2] + 2.0]).astype(np.float32)
    fine = [factor * n for n in coarse]
    b = np.meshgrid(*[np.arange(N, dtype=np.float64) * (n - 1) / (N - 1) for n, N in zip(coarse, fine)], indexing="ij")
    expected = factor * np.stack([0.5 * b[0] - 1.0, 0.25 * b[1] + 0.5 * b[2], -b[2] + 2.0])
    np.testing.assert_allclose(upsample(flow, factor), expected, rtol=0, atol=1e-5)


def test_constant_flow_stays_constant_times_factor() -> None:
    flow = np.empty((3, 3, 4, 5), np.float32)
    flow[:] = np.array([1.5, -2.0, 0.25], np.float32).reshape(3, 1, 1, 1)
    out = upsample2(flow)
    np.testing.assert_allclose(out, np.broadcast_to(2 * flow[:, :1, :1, :1], out.shape), rtol=1e-7, atol=0)


def test_upsample2_is_upsample_by_two(rng: np.random.Generator) -> None:
    flow = rng.standard_normal((3, 5, 6, 7)).astype(np.float32)
    np.testing.assert_array_equal(upsample2(flow), upsample(flow, 2))


def test_out_is_written_and_reused(rng: np.random.Generator) -> None:
    out = np.full((3, 10, 12, 14), np.nan, np.float32)
    for _ in range(2):
        flow = rng.standard_normal((3, 5, 6, 7)).astype(np.float32)
        assert upsample2(flow, out=out) is out
        np.testing.assert_array_equal(out, upsample(flow, 2))
    assert upsample(flow[:, :, :, :5], 1, out=out[:, :5, :6, :5].copy()).shape == (3, 5, 6, 5)


def test_float64_input_is_converted(rng: np.random.Generator) -> None:
    flow = rng.standard_normal((3, 5, 6, 7))
    out = upsample(flow, 2)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, upsample(flow.astype(np.float32), 2))


def test_argument_errors() -> None:
    flow = np.zeros((3, 5, 6, 7), np.float32)
    with pytest.raises(ValueError, match=r"upsample\(\) 'factor' must be a positive integer, got 0"):
        upsample(flow, 0)
    with pytest.raises(TypeError, match=r"upsample\(\) 'factor' must be a positive integer, got 2.0"):
        upsample(flow, 2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"upsample\(\) 'factor' must be a positive integer, got True"):
        upsample(flow, True)
    with pytest.raises(ValueError, match=r"upsample\(\) 'flow' must have shape \(3, 5, 6, 7\), got \(2, 5, 6, 7\)"):
        upsample(np.zeros((2, 5, 6, 7), np.float32), 2)
    with pytest.raises(ValueError, match=r"upsample2\(\) 'flow' must have shape \(3, x, y, z\), got \(5, 6, 7\)"):
        upsample2(flow[0])
    with pytest.raises(ValueError, match=r"upsample2\(\) 'out' must be a C-contiguous float32 numpy array of shape \(3, 10, 12, 14\), got C-contiguous float32 array of shape \(3, 10, 12, 7\)"):
        upsample2(flow, out=np.zeros((3, 10, 12, 7), np.float32))
    with pytest.raises(ValueError, match=r"upsample\(\) 'out' must be .* got C-contiguous float64"):
        upsample(flow, 4, out=np.zeros((3, 20, 24, 28)))
    with pytest.raises(TypeError, match=r"upsample\(\) 'flow' must be a real-valued array, got dtype bool"):
        upsample(flow > 0, 2)
