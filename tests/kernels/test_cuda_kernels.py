"""CUDA kernels (:mod:`iirp.kernels.cuda_ops`) against the numba reference kernels, on a GPU.

Marked ``gpu``; skipped without torch with CUDA, cuda.core, or a device.
Device arrays are torch CUDA tensors (one CuPy case when CuPy is installed).

The CUDA code is compiled with ``--fmad=false`` and ports the numba arithmetic
operation for operation (float32, same blend order), so warp, compose,
upsample and the label warp must match *exactly*; fp16 storage must equal the
numba float32 result rounded to float16. The fused score adds the same float64
terms in another order, hence :data:`SCORE_ATOL`. Shapes are non-cubic, so a
swapped axis cannot pass; flows point outside the volume, at exact borders,
and hold NaN and infinities.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from iirp.kernels.score import fused_ncc_score as cpu_score
from iirp.kernels.upsample import upsample as cpu_upsample
from iirp.kernels.warp import compose as cpu_compose
from iirp.kernels.warp import warp as cpu_warp

pytestmark = pytest.mark.gpu

#: GPU vs numba fused score: same per-voxel float64 terms, summed in another order.
SCORE_ATOL = 1e-9

SHAPES = [(5, 6, 7), (1, 4, 9), (7, 1, 5), (9, 8, 2)]


@pytest.fixture(scope="module")
def torch(cuda_torch: Any) -> Any:
    """The torch module, with a CUDA device and cuda.core (tests/conftest.py); skips otherwise."""
    return cuda_torch


@pytest.fixture(scope="module")
def ops(torch: Any) -> Any:
    from iirp.kernels import cuda_ops

    return cuda_ops


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240607)


def _gpu(torch: Any, array: np.ndarray) -> Any:
    return torch.from_numpy(np.ascontiguousarray(array)).cuda()


def _cpu(torch: Any, tensor: Any) -> np.ndarray:
    torch.cuda.synchronize()
    return tensor.cpu().numpy()


def _flow(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 3.0) -> np.ndarray:
    """Random flow, mostly inside, many corners outside near the borders, plus special values."""
    flow = rng.uniform(-scale, scale, (3, *shape)).astype(np.float32)
    flat = flow.reshape(3, -1)
    n = flat.shape[1]
    special = [np.nan, np.inf, -np.inf, 1e30, -1e30, 100.0, -100.0]
    for k, value in enumerate(special):
        flat[k % 3, (7 * k) % n] = value
    return flow


def _border_flow(shape: tuple[int, ...]) -> np.ndarray:
    """Flows that land exactly on -1, 0, n - 1 and n along each axis, and just inside -1."""
    idx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    flow = np.zeros((3, *shape), np.float32)
    for c, n in enumerate(shape):
        targets = np.array([-1.0, np.nextafter(np.float32(-1), np.float32(0)), 0.0, n - 1, n, n - 0.5],
                           dtype=np.float32)
        pick = targets[(np.arange(idx[c].size).reshape(shape) + c) % targets.size]
        flow[c] = pick - idx[c]
    return flow


# ----------------------------------------------------------------------------- warp


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels", [None, 1, 4])
def test_warp_float32_matches_numba(torch: Any, ops: Any, rng: np.random.Generator, shape: tuple[int, ...],
                                    channels: Any) -> None:
    src = rng.standard_normal(shape if channels is None else (channels, *shape)).astype(np.float32)
    for flow in (_flow(rng, shape), _border_flow(shape), np.zeros((3, *shape), np.float32)):
        got = ops.warp(_gpu(torch, src), _gpu(torch, flow))
        assert got.dtype == torch.float32 and tuple(got.shape) == src.shape and got.is_cuda
        np.testing.assert_array_equal(_cpu(torch, got), cpu_warp(src, flow))


def test_warp_zero_flow_is_identity(torch: Any, ops: Any, rng: np.random.Generator) -> None:
    src = rng.standard_normal((3, 6, 5, 4)).astype(np.float32)
    got = ops.warp(_gpu(torch, src), _gpu(torch, np.zeros((3, 6, 5, 4), np.float32)))
    np.testing.assert_array_equal(_cpu(torch, got), src)


@pytest.mark.parametrize("shape", SHAPES)
def test_warp_float16_storage(torch: Any, ops: Any, rng: np.random.Generator, shape: tuple[int, ...]) -> None:
    src = rng.standard_normal((8, *shape)).astype(np.float16)
    flow = _flow(rng, shape)
    got = ops.warp(_gpu(torch, src), _gpu(torch, flow))
    assert got.dtype == torch.float16
    expected = cpu_warp(src.astype(np.float32), flow).astype(np.float16)  # float32 blend, one rounding
    np.testing.assert_array_equal(_cpu(torch, got), expected)


def test_warp_into_out(torch: Any, ops: Any, rng: np.random.Generator) -> None:
    src = rng.standard_normal((2, 5, 6, 7)).astype(np.float32)
    flow = _flow(rng, (5, 6, 7))
    out = torch.full((2, 5, 6, 7), 123.0, device="cuda")
    result = ops.warp(_gpu(torch, src), _gpu(torch, flow), out=out)
    assert result is out
    np.testing.assert_array_equal(_cpu(torch, out), cpu_warp(src, flow))


def test_warp_on_a_side_stream(torch: Any, ops: Any, rng: np.random.Generator) -> None:
    src = rng.standard_normal((5, 6, 7)).astype(np.float32)
    flow = _flow(rng, (5, 6, 7))
    src_d, flow_d = _gpu(torch, src), _gpu(torch, flow)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # stream=None: torch's current stream
        implicit = ops.warp(src_d, flow_d)
    explicit = torch.empty_like(src_d)
    ops.warp(src_d, flow_d, out=explicit, stream=side)
    side.synchronize()
    np.testing.assert_array_equal(implicit.cpu().numpy(), cpu_warp(src, flow))
    np.testing.assert_array_equal(explicit.cpu().numpy(), cpu_warp(src, flow))


def test_warp_cupy(ops: Any, rng: np.random.Generator) -> None:
    cupy = pytest.importorskip("cupy")
    src = rng.standard_normal((2, 5, 6, 7)).astype(np.float32)
    flow = _flow(rng, (5, 6, 7))
    got = ops.warp(cupy.asarray(src), cupy.asarray(flow))
    assert isinstance(got, cupy.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(cupy.asnumpy(got), cpu_warp(src, flow))


# -------------------------------------------------------------------------- compose


@pytest.mark.parametrize("shape", SHAPES)
def test_compose_matches_numba(torch: Any, ops: Any, rng: np.random.Generator, shape: tuple[int, ...]) -> None:
    phi = rng.uniform(-2, 2, (3, *shape)).astype(np.float32)
    for du in (_flow(rng, shape), _border_flow(shape)):
        got = ops.compose(_gpu(torch, phi), _gpu(torch, du))
        assert got.dtype == torch.float32 and tuple(got.shape) == phi.shape
        np.testing.assert_array_equal(_cpu(torch, got), cpu_compose(phi, du))


def test_compose_with_zero_phi_is_du(torch: Any, ops: Any, rng: np.random.Generator) -> None:
    du = rng.uniform(-2, 2, (3, 5, 6, 7)).astype(np.float32)
    got = ops.compose(_gpu(torch, np.zeros_like(du)), _gpu(torch, du))
    np.testing.assert_array_equal(_cpu(torch, got), du)


# ------------------------------------------------------------------------- upsample


@pytest.mark.parametrize("shape", [(4, 5, 6), (1, 3, 2), (2, 2, 2), (3, 7, 1)])
@pytest.mark.parametrize("factor", [1, 2, 3, 4])
def test_upsample_matches_numba(torch: Any, ops: Any, rng: np.random.Generator, shape: tuple[int, ...],
                                factor: int) -> None:
    flow = rng.uniform(-3, 3, (3, *shape)).astype(np.float32)
    got = ops.upsample(_gpu(torch, flow), factor)
    assert tuple(got.shape) == (3, *(factor * n for n in shape)) and got.dtype == torch.float32
    np.testing.assert_array_equal(_cpu(torch, got), cpu_upsample(flow, factor))


def test_upsample2_matches_interpolate(torch: Any, ops: Any, rng: np.random.Generator) -> None:
    from torch.nn import functional as F

    flow = rng.uniform(-3, 3, (3, 4, 5, 6)).astype(np.float32)
    got = ops.upsample2(_gpu(torch, flow))
    ref = 2 * F.interpolate(_gpu(torch, flow)[None], scale_factor=2, mode="trilinear", align_corners=True)[0]
    np.testing.assert_allclose(_cpu(torch, got), _cpu(torch, ref), rtol=0, atol=1e-5)


def test_upsample_constant_flow_is_scaled(torch: Any, ops: Any) -> None:
    flow = np.stack([np.full((3, 4, 5), v, np.float32) for v in (0.5, -1.25, 2.0)])
    got = _cpu(torch, ops.upsample(_gpu(torch, flow), 4))
    for c, v in enumerate((0.5, -1.25, 2.0)):
        np.testing.assert_array_equal(got[c], np.float32(4 * v))  # vectors follow the grid


# ---------------------------------------------------------------------------- score


@pytest.mark.parametrize("factor", [1, 2, 4])
@pytest.mark.parametrize("shape", [(16, 24, 8), (64, 48, 40)])
def test_fused_score_matches_numba(torch: Any, ops: Any, rng: np.random.Generator, factor: int,
                                   shape: tuple[int, ...]) -> None:
    moving = rng.uniform(0, 1, shape).astype(np.float32)
    coarse = tuple(n // factor for n in shape)
    flow = rng.uniform(-2, 2, (3, *coarse)).astype(np.float32)
    related = cpu_warp(moving, cpu_upsample(flow, factor))
    for fixed in (rng.uniform(0, 1, shape).astype(np.float32),
                  (related + 0.1 * rng.standard_normal(shape)).astype(np.float32)):
        expected = cpu_score(moving, fixed, flow, factor)
        got = ops.fused_ncc_score(_gpu(torch, moving), _gpu(torch, fixed), _gpu(torch, flow), factor)
        assert isinstance(got, float)
        assert got == pytest.approx(expected, abs=SCORE_ATOL)


def test_fused_score_is_deterministic(torch: Any, ops: Any, rng: np.random.Generator) -> None:
    shape = (64, 48, 40)
    moving, fixed = (_gpu(torch, rng.uniform(0, 1, shape).astype(np.float32)) for _ in range(2))
    flow = _gpu(torch, rng.uniform(-2, 2, (3, 32, 24, 20)).astype(np.float32))
    scores = {ops.fused_ncc_score(moving, fixed, flow, 2) for _ in range(5)}
    assert len(scores) == 1


def test_fused_score_special_cases(torch: Any, ops: Any, rng: np.random.Generator) -> None:
    shape = (8, 12, 6)
    moving = rng.uniform(0, 1, shape).astype(np.float32)
    zero = np.zeros((3, 4, 6, 3), np.float32)
    d = {k: _gpu(torch, v) for k, v in {"m": moving, "zero": zero}.items()}
    # no flow: an image with itself scores (n - 1) / n (mean of products over unbiased stds, SPEC 3)
    n = moving.size
    assert ops.fused_ncc_score(d["m"], d["m"], d["zero"], 2) == pytest.approx((n - 1) / n, abs=1e-12)
    assert cpu_score(moving, moving, zero, 2) == pytest.approx((n - 1) / n, abs=1e-12)
    # a constant image correlates with nothing
    const = _gpu(torch, np.full(shape, 0.5, np.float32))
    assert ops.fused_ncc_score(d["m"], const, d["zero"], 2) == 0.0
    # a flow pointing everywhere outside (and NaN) samples only zeros: a is constant 0
    away = np.full((3, 4, 6, 3), 1e3, np.float32)
    away[0, 0, 0, 0] = np.nan
    assert ops.fused_ncc_score(d["m"], d["m"], _gpu(torch, away), 2) == 0.0
    assert cpu_score(moving, moving, away, 2) == 0.0


def test_fused_score_on_a_side_stream(torch: Any, ops: Any, rng: np.random.Generator) -> None:
    shape = (16, 24, 8)
    moving, fixed = (rng.uniform(0, 1, shape).astype(np.float32) for _ in range(2))
    flow = rng.uniform(-2, 2, (3, 8, 12, 4)).astype(np.float32)
    args = [_gpu(torch, a) for a in (moving, fixed, flow)]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    got = ops.fused_ncc_score(*args, 2, stream=side)
    assert got == pytest.approx(cpu_score(moving, fixed, flow, 2), abs=SCORE_ATOL)


# --------------------------------------------------------------------------- labels


def _nearest_reference(labels: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Hand reference: round half up per axis (exactly), label 0 unless -1/2 <= p < n - 1/2 on every axis."""
    shape = labels.shape
    idx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    inside = np.ones(shape, bool)
    rounded = []
    with np.errstate(invalid="ignore"):
        for c, n in enumerate(shape):
            t = idx[c] + flow[c]  # float32, as the kernel
            ok = (t >= np.float32(-0.5)) & (t < np.float32(n) - np.float32(0.5))
            f = np.floor(np.where(ok, t, 0))
            rounded.append((f + (np.where(ok, t, 0) - f >= 0.5)).astype(np.int64))
            inside &= ok
    out = np.zeros_like(labels)
    out[inside] = labels[rounded[0][inside], rounded[1][inside], rounded[2][inside]]
    return out


@pytest.mark.parametrize("dtype", [np.int32, np.int16, np.uint8])
@pytest.mark.parametrize("shape", SHAPES)
def test_warp_labels_matches_reference(torch: Any, ops: Any, rng: np.random.Generator, dtype: Any,
                                       shape: tuple[int, ...]) -> None:
    labels = rng.integers(1, 120, shape).astype(dtype)
    halves = np.round(rng.uniform(-3, 3, (3, *shape)) * 2).astype(np.float32) / 2  # many exact .5 ties
    for flow in (_flow(rng, shape), _border_flow(shape), halves):
        got = ops.warp_labels(_gpu(torch, labels), _gpu(torch, flow))
        assert got.dtype == _gpu(torch, labels).dtype and tuple(got.shape) == shape
        np.testing.assert_array_equal(_cpu(torch, got), _nearest_reference(labels, flow))


def test_warp_labels_rounding_by_hand(torch: Any, ops: Any) -> None:
    labels = np.arange(1, 6, dtype=np.int32).reshape(5, 1, 1)  # label = x + 1 along x (n = 5)
    # sample point of voxel x = 0 (flow there; identity elsewhere) -> label expected at x = 0
    at_zero = {
        0.5: 2,  # a tie rounds up
        0.49999997: 1,  # just below the tie (0.49999997f + 0.5f would round to 1.0f)
        -0.5: 1,  # -1/2 is inside and rounds up to index 0
        -0.50000006: 0,  # just below -1/2: outside
        1.5: 3,
        4.4999995: 5,  # just below n - 1/2 (the float32 before 4.5)
        4.5: 0,  # n - 1/2: outside
        np.nan: 0,
        np.inf: 0,
        -np.inf: 0,
    }
    for target, expected in at_zero.items():
        flow = np.zeros((3, 5, 1, 1), np.float32)
        flow[0, 0] = np.float32(target)
        got = _cpu(torch, ops.warp_labels(_gpu(torch, labels), _gpu(torch, flow))).reshape(-1)
        assert got.tolist() == [expected, 2, 3, 4, 5], target
    # whole-volume shifts by exact halves
    for shift, expected_all in {0.5: [2, 3, 4, 5, 0], -0.5: [1, 2, 3, 4, 5], 1.5: [3, 4, 5, 0, 0]}.items():
        flow = np.zeros((3, 5, 1, 1), np.float32)
        flow[0] = np.float32(shift)
        got = _cpu(torch, ops.warp_labels(_gpu(torch, labels), _gpu(torch, flow))).reshape(-1)
        assert got.tolist() == expected_all, shift


# ------------------------------------------------------------------------------ misc


def test_kernels_target_the_device(torch: Any, ops: Any) -> None:
    from iirp.kernels import cuda_build

    major, minor = torch.cuda.get_device_capability(0)
    assert cuda_build.device_arch(0) == f"sm_{major}{minor}"
    kernels = cuda_build.get_kernels("warp.cu", 0)
    assert set(kernels) == set(cuda_build.KERNELS["warp.cu"])
    assert cuda_build.compile_source("warp.cu", f"sm_{major}{minor}").warnings == ()
