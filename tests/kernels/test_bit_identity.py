"""The restructured numba kernels against a frozen copy of the e109593 kernels (``numba_e109593.py``).

warp, compose, upsample and upsample2 must return the same float32 bits as
before (the CUDA kernels are ports of that per-voxel arithmetic); the fused
score must use the same per-voxel terms ``a`` (warped moving sample) and ``b``
(fixed), and may only add its float64 sums in another fixed order. Inputs
include flows that leave the volume, NaN, infinities, -0.0, huge values, points
exactly on the border, non-cubic shapes, rows longer than one chunk and size-1
axes. NaN results are compared by position only: LLVM may order the operands of
a commutative operation differently, which changes the payload of a NaN made
from two NaNs, not whether the result is NaN.
"""

from __future__ import annotations

import importlib

import numba_e109593 as before
import numpy as np
import pytest

from iirp.kernels import compose, fused_ncc_score, ncc, upsample, upsample2, warp

_score = importlib.import_module("iirp.kernels.score")
_upsample = importlib.import_module("iirp.kernels.upsample")
_warp = importlib.import_module("iirp.kernels.warp")

#: Spatial shapes: non-cubic, size-1 axes, z rows shorter than, equal to and longer than a chunk.
SHAPES = [(6, 5, 7), (3, 2, 1), (1, 1, 2), (2, 1, 65), (4, 3, 130), (5, 7, 64)]
#: Channel counts: below and above the channels-last threshold, not multiples of the lane count.
CHANNELS = [1, 3, 7, 8, 9, 16, 33]
#: Fused score: sums and scores of the new fixed summation order vs the e109593 order.
SUM_RTOL = 1e-12
SCORE_ATOL = 1e-12


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261129)


def assert_same_bits(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same dtype, shape and float32 bits; NaN compared by position (see the module docstring)."""
    assert actual.dtype == expected.dtype == np.float32
    assert actual.shape == expected.shape
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    same = np.where(nan, 0, actual).view(np.uint32) == np.where(nan, 0, expected).view(np.uint32)
    if not same.all():
        where = tuple(int(i) for i in np.argwhere(~same)[0])
        raise AssertionError(
            f"{int((~same).sum())} values differ in their bits, first at {where}: "
            f"{actual[where]!r} vs {expected[where]!r}"
        )


def _specials(rng: np.random.Generator, array: np.ndarray, values: list[float]) -> np.ndarray:
    """``array`` with a few entries replaced by each of ``values`` (in place, returned)."""
    flat = array.reshape(-1)
    for value in values:
        flat[rng.integers(0, flat.size, size=max(1, flat.size // 50))] = value
    return array


def _flow(rng: np.random.Generator, shape: tuple[int, int, int], scale: float) -> np.ndarray:
    """A ``(3, *shape)`` flow: Gaussian, some points outside, some exactly on the border, special values."""
    flow = (rng.standard_normal((3, *shape)) * scale).astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    ends = np.array(shape, np.float32).reshape(3, 1, 1, 1)
    # sample points exactly at -1, at 0, at n - 1 and at n on a few voxels (the border cases of _axis)
    for target in (-1.0, 0.0, ends - 1, ends, -1.0 + 1e-6, ends - 1e-6):
        pick = rng.random((3, *shape)) < 0.03
        flow = np.where(pick, (target - grid).astype(np.float32), flow)
    return _specials(rng, flow, [np.nan, np.inf, -np.inf, -0.0, 1e30, -1e30, 0.5])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels", CHANNELS)
def test_warp_matches_e109593(rng: np.random.Generator, shape: tuple[int, int, int], channels: int) -> None:
    src = _specials(rng, rng.standard_normal((channels, *shape)).astype(np.float32), [np.inf, -np.inf, -0.0, 0.0])
    flow = _flow(rng, shape, 2.0)
    assert_same_bits(warp(src, flow), before.warp(src, flow))
    if channels == 1:
        assert_same_bits(warp(src[0], flow), before.warp(src[0], flow))


@pytest.mark.parametrize("shape", SHAPES)
def test_compose_matches_e109593(rng: np.random.Generator, shape: tuple[int, int, int]) -> None:
    phi = _flow(rng, shape, 3.0)
    du = _flow(rng, shape, 1.0)
    assert_same_bits(compose(phi, du), before.compose(phi, du))
    smooth = (rng.standard_normal((3, *shape)) * 0.3).astype(np.float32)  # mostly inside
    assert_same_bits(compose(phi, smooth), before.compose(phi, smooth))


@pytest.mark.parametrize("factor", range(1, 9))
@pytest.mark.parametrize("coarse", [(3, 2, 4), (1, 3, 2), (2, 1, 1), (5, 4, 17)])
def test_upsample_matches_e109593(rng: np.random.Generator, factor: int, coarse: tuple[int, int, int]) -> None:
    flow = _specials(rng, (rng.standard_normal((3, *coarse)) * 3).astype(np.float32), [np.nan, np.inf, -0.0])
    assert_same_bits(upsample(flow, factor), before.upsample(flow, factor))
    if factor == 2:
        assert_same_bits(upsample2(flow), before.upsample2(flow))


def test_work_buffers_are_reused_across_shapes(rng: np.random.Generator) -> None:
    """The channels-last and plane work buffers shrink and grow with the call: results stay exact."""
    for shape, channels, factor in [((8, 6, 70), 16, 2), ((3, 4, 5), 9, 4), ((10, 9, 12), 32, 3), ((2, 2, 2), 8, 1)]:
        src = rng.standard_normal((channels, *shape)).astype(np.float32)
        flow = _flow(rng, shape, 2.0)
        assert_same_bits(warp(src, flow), before.warp(src, flow))
        assert_same_bits(upsample(flow, factor), before.upsample(flow, factor))


@pytest.mark.parametrize("tile", [1, 2, 5, 64])
def test_tiling_does_not_change_results(rng: np.random.Generator, tile: int) -> None:
    """The x-tile width (chosen from the thread count) changes the work split, never a value."""
    shape = (11, 6, 70)
    flow = _flow(rng, shape, 2.0)
    for channels in (3, 8):
        src = rng.standard_normal((channels, *shape)).astype(np.float32)
        out = np.empty_like(src)
        if channels < _warp._CL_MIN_CHANNELS:
            _warp._warp_kernel(src, flow, out, False, tile)
        else:
            _warp._warp_cl_kernel(src, flow, out, np.empty(src.size + _warp.LANES, np.float32), tile)
        assert_same_bits(out, before.warp(src, flow))
    moving, fixed = rng.random((2, 12, 6, 70), dtype=np.float32)
    coarse = (rng.standard_normal((3, 6, 3, 35)) * 2).astype(np.float32)
    planes = _planes(coarse, 2)
    reference = _score._fused_sums(moving, fixed, *planes, np.float32(2), 1)
    np.testing.assert_array_equal(_score._fused_sums(moving, fixed, *planes, np.float32(2), tile), reference)


def _smooth(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    axes = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    vol = np.sin(5 * axes[0] + rng.random()) * np.cos(4 * axes[1]) * np.sin(3 * axes[2] + rng.random())
    vol += 0.1 * rng.random(shape)
    return ((vol - vol.min()) / (vol.max() - vol.min())).astype(np.float32)


@pytest.mark.parametrize("factor", [1, 2, 3, 4, 8])
def test_fused_score_matches_e109593(rng: np.random.Generator, factor: int) -> None:
    shape = (24, 24, 136 + 8)  # divisible by 1, 2, 3, 4 and 8; z rows longer than two chunks
    moving, fixed = _smooth(rng, shape), _smooth(rng, shape)
    coarse = tuple(n // factor for n in shape)
    flow = _specials(rng, (rng.standard_normal((3, *coarse)) * 4.0 / factor).astype(np.float32), [50.0, -0.0])
    sums = _score._total(_score._fused_sums(moving, fixed, *_planes(flow, factor), np.float32(factor), 3))
    expected = _score._total(before.fused_sums(moving, fixed, flow, factor))
    np.testing.assert_allclose(sums, expected, rtol=SUM_RTOL, atol=0)
    assert fused_ncc_score(moving, fixed, flow, factor) == pytest.approx(
        before.fused_ncc_score(moving, fixed, flow, factor), abs=SCORE_ATOL)
    assert ncc(moving, fixed) == before.ncc(moving, fixed)  # unchanged kernel, same order


def _planes(flow: np.ndarray, factor: int) -> tuple:
    planes, tx, ty = _upsample._flow_planes(flow, factor)
    return (planes.copy(), *tx, *ty)


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_fused_score_terms_are_bit_identical(rng: np.random.Generator, factor: int) -> None:
    """Per-voxel ``a`` and ``b``: with a one-hot fixed image the sums of b and a*b are b and a at that voxel."""
    shape = (4, 4, 8)
    moving = _specials(rng, rng.standard_normal(shape).astype(np.float32), [-0.0, 1e-39])
    flow = _flow(rng, tuple(n // factor for n in shape), 2.0 / factor)
    planes = _planes(flow, factor)
    for index in np.ndindex(*shape):
        fixed = np.zeros(shape, np.float32)
        fixed[index] = 1.0
        new = _score._total(_score._fused_sums(moving, fixed, *planes, np.float32(factor), 2))
        old = _score._total(before.fused_sums(moving, fixed, flow, factor))
        # sab = a * 1 at this voxel (0 where the point is outside), exactly; sb = b
        assert np.float64(new[4]).tobytes() == np.float64(old[4]).tobytes(), index
        assert new[1] == old[1] == 1.0


def test_kernels_keep_fastmath_off() -> None:
    """No FMA contraction or reassociation: every kernel is compiled with fastmath off."""
    for module, names in ((_warp, ["_warp_kernel", "_warp_cl_kernel", "_warp_tile", "_warp_cl_tile"]),
                          (_upsample, ["_upsample_kernel", "_zlerp_planes"]),
                          (_score, ["_fused_sums", "_score_tile", "_centered_sums"])):
        for name in names:
            fastmath = getattr(module, name).targetoptions.get("fastmath", False)
            assert not fastmath, f"{module.__name__}.{name} has fastmath={fastmath!r}"
