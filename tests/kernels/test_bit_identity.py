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

_sampling = importlib.import_module("iirp.kernels._sampling")
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


@pytest.mark.parametrize("cuts", [(), (1,), (3, 4), (2, 5, 9, 10)])
def test_work_split_does_not_change_results(rng: np.random.Generator, cuts: tuple[int, ...]) -> None:
    """Work items (ranges of x slabs, handed to threads) change who computes a voxel, never its value."""
    shape = (11, 6, 70)
    bounds = [0, *cuts, shape[0]]
    flow = _flow(rng, shape, 2.0)
    for channels in (3, 8):
        src = rng.standard_normal((channels, *shape)).astype(np.float32)
        out = np.full_like(src, np.nan)
        cl = np.zeros(src.size + _warp.LANES, np.float32)
        for a, b in zip(bounds[:-1], bounds[1:]):
            _warp._to_channels_last(src, cl, a, b)
        for a, b in zip(bounds[:-1], bounds[1:]):
            if channels < _warp._CL_MIN_CHANNELS:
                tables = _warp._identity_tables(shape[0]) + _warp._identity_tables(shape[1])
                _sampling.sample_tile(src, flow, *tables, np.float32(1), _sampling.WARP, out, src[0],
                                      np.zeros((1, 5)), a, b, 0)
            else:
                _warp._warp_cl_tile(cl, flow, out, a, b)
        assert_same_bits(out, before.warp(src, flow))
    moving, fixed = rng.random((2, 12, 6, 70), dtype=np.float32)
    coarse = (rng.standard_normal((3, 6, 3, 35)) * 2).astype(np.float32)
    planes, tx, ty = _upsample._flow_planes(coarse, 2)
    partials = np.full((12, 5), np.nan)
    bounds[-1] = 12
    for a, b in zip(bounds[:-1], bounds[1:]):
        _sampling.sample_tile(moving[None], planes, *tx, *ty, np.float32(2), _sampling.SCORE, moving[None], fixed,
                              partials, a, b, 0)
    np.testing.assert_array_equal(partials, _score._fused_sums(moving, fixed, coarse, 2))


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_does_not_change_results(rng: np.random.Generator, threads: int) -> None:
    """Big enough calls go through the thread pool; with one thread they run inline: the same bits."""
    numba = pytest.importorskip("numba")
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"needs {threads} numba threads")
    shape = (40, 32, 80)  # above the serial threshold for 3 channels
    flow = _flow(rng, shape, 2.0)
    src = rng.standard_normal((8, *shape)).astype(np.float32)
    moving, fixed = rng.random((2, *shape), dtype=np.float32)
    coarse = (rng.standard_normal((3, 20, 16, 40)) * 2).astype(np.float32)
    before_threads = numba.get_num_threads()
    try:
        numba.set_num_threads(threads)
        results = (warp(src, flow), compose(flow, flow * 0.25), upsample(coarse, 2),
                   _score._fused_sums(moving, fixed, coarse, 2))
    finally:
        numba.set_num_threads(before_threads)
    assert_same_bits(results[0], before.warp(src, flow))
    assert_same_bits(results[1], before.compose(flow, flow * 0.25))
    assert_same_bits(results[2], before.upsample(coarse, 2))
    numba.set_num_threads(1)
    try:
        serial = _score._fused_sums(moving, fixed, coarse, 2)
    finally:
        numba.set_num_threads(before_threads)
    np.testing.assert_array_equal(results[3], serial)


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
    sums = _score._total(_score._fused_sums(moving, fixed, flow, factor))
    expected = _score._total(before.fused_sums(moving, fixed, flow, factor))
    np.testing.assert_allclose(sums, expected, rtol=SUM_RTOL, atol=0)
    assert fused_ncc_score(moving, fixed, flow, factor) == pytest.approx(
        before.fused_ncc_score(moving, fixed, flow, factor), abs=SCORE_ATOL)
    assert ncc(moving, fixed) == before.ncc(moving, fixed)  # unchanged kernel, same order


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_fused_score_terms_are_bit_identical(rng: np.random.Generator, factor: int) -> None:
    """Per-voxel ``a`` and ``b``: with a one-hot fixed image the sums of b and a*b are b and a at that voxel."""
    shape = (4, 4, 8)
    moving = _specials(rng, rng.standard_normal(shape).astype(np.float32), [-0.0, 1e-39])
    flow = _flow(rng, tuple(n // factor for n in shape), 2.0 / factor)
    for index in np.ndindex(*shape):
        fixed = np.zeros(shape, np.float32)
        fixed[index] = 1.0
        new = _score._total(_score._fused_sums(moving, fixed, flow, factor))
        old = _score._total(before.fused_sums(moving, fixed, flow, factor))
        # sab = a * 1 at this voxel (0 where the point is outside), exactly; sb = b
        assert np.float64(new[4]).tobytes() == np.float64(old[4]).tobytes(), index
        assert new[1] == old[1] == 1.0


def test_kernels_keep_fastmath_off() -> None:
    """No FMA contraction or reassociation: every kernel is compiled with fastmath off."""
    kernels = [_sampling.sample_tile, _warp._to_channels_last, _warp._warp_cl_tile, _upsample._upsample_rows,
               _upsample._zlerp_planes, _score._centered_chunks]
    for kernel in kernels:
        fastmath = kernel.targetoptions.get("fastmath", False)
        assert not fastmath, f"{kernel.__name__} has fastmath={fastmath!r}"
