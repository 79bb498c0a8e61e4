"""Global NCC and the fused IterStop score of :mod:`iirp.kernels` against the unfused path and torch.

``fused_ncc_score(m, f, u, s) = ncc(warp(m, upsample(u, s)), f)`` (SPEC 3 and 5),
with the global NCC ``mean((a - ma)(b - mb)) / (std_a std_b)``, unbiased std.
"""

from __future__ import annotations

import numpy as np
import pytest

from iirp.kernels import fused_ncc_score, ncc, upsample, warp

#: fused one-pass float64 sums vs the two-pass ncc of the unfused arrays.
FUSED_ATOL = 1e-6
#: vs the torch reference (float32 warp through normalised coordinates).
TORCH_ATOL = 1e-5
SHAPE = (32, 16, 24)  # divisible by 8, non-cubic


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def _smooth(rng: np.random.Generator, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """A smooth [0, 1] volume: a few random Gaussian blobs plus a little noise."""
    axes = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    vol = np.zeros(shape)
    for _ in range(4):
        centre = rng.uniform(0, 1, 3) * np.asarray(shape)
        vol += np.exp(-sum((a - c) ** 2 for a, c in zip(axes, centre)) / (2 * 4.0**2))
    vol += 0.05 * rng.random(shape)
    return (vol / vol.max()).astype(np.float32)


def _torch_score(moving: np.ndarray, fixed: np.ndarray, flow: np.ndarray) -> float:
    torch = pytest.importorskip("torch")
    from iirp.model import spatial

    up = spatial.upsample_flow(torch.from_numpy(flow)[None], moving.shape)
    warped = spatial.warp(torch.from_numpy(moving)[None, None], up)
    return spatial.ncc(warped, torch.from_numpy(fixed)[None, None])


# --------------------------------------------------------------------------- ncc


def test_ncc_matches_torch(rng: np.random.Generator) -> None:
    torch = pytest.importorskip("torch")
    from iirp.model import spatial

    a, b = _smooth(rng), _smooth(rng)
    b = 0.5 * a + b
    value = ncc(a, b)
    assert isinstance(value, float)
    assert value == pytest.approx(spatial.ncc(torch.from_numpy(a), torch.from_numpy(b)), abs=1e-12)


def test_ncc_analytic(rng: np.random.Generator) -> None:
    a = rng.random((6, 10, 14), dtype=np.float32)
    n = a.size
    # mean of the product over N, unbiased std over N - 1: identical images score (N - 1) / N
    assert ncc(a, a) == pytest.approx((n - 1) / n, abs=1e-12)
    assert ncc(a, -a) == pytest.approx(-(n - 1) / n, abs=1e-12)
    assert ncc(a, 2 * a + 3) == pytest.approx((n - 1) / n, abs=1e-6)
    assert ncc(a, np.full_like(a, 0.3)) == 0.0
    assert ncc(np.zeros_like(a), a) == 0.0
    x = np.array([0.0, 1.0], np.float32)
    assert ncc(x, x) == pytest.approx(0.5)


def test_ncc_argument_errors() -> None:
    a = np.zeros((5, 6, 7), np.float32)
    with pytest.raises(ValueError, match=r"ncc\(\) 'b' must have shape \(5, 6, 7\), got \(5, 6, 8\)"):
        ncc(a, np.zeros((5, 6, 8), np.float32))
    with pytest.raises(ValueError, match=r"ncc\(\) 'a' needs at least 2 elements, got shape \(1,\)"):
        ncc(np.zeros(1, np.float32), np.zeros(1, np.float32))
    with pytest.raises(TypeError, match=r"ncc\(\) 'a' must be a real-valued array, got dtype complex128"):
        ncc(a.astype(complex), a)


# --------------------------------------------------------------------------- fused score


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_fused_matches_unfused_and_torch(rng: np.random.Generator, factor: int) -> None:
    moving, fixed = _smooth(rng), _smooth(rng)
    coarse = tuple(n // factor for n in SHAPE)
    # displacements of a few full-resolution voxels, some leaving the volume
    flow = (rng.standard_normal((3, *coarse)) * 3.0 / factor).astype(np.float32)
    value = fused_ncc_score(moving, fixed, flow, factor)
    assert isinstance(value, float)
    unfused = ncc(warp(moving, upsample(flow, factor)), fixed)
    assert value == pytest.approx(unfused, abs=FUSED_ATOL)
    assert value == pytest.approx(_torch_score(moving, fixed, flow), abs=TORCH_ATOL)


@pytest.mark.parametrize("factor", [2, 8])
def test_fused_with_large_flows(rng: np.random.Generator, factor: int) -> None:
    moving, fixed = _smooth(rng), _smooth(rng)
    coarse = tuple(n // factor for n in SHAPE)
    flow = (rng.standard_normal((3, *coarse)) * 12.0 / factor).astype(np.float32)
    value = fused_ncc_score(moving, fixed, flow, factor)
    assert value == pytest.approx(ncc(warp(moving, upsample(flow, factor)), fixed), abs=FUSED_ATOL)
    assert value == pytest.approx(_torch_score(moving, fixed, flow), abs=TORCH_ATOL)


def test_fused_zero_flow_is_plain_ncc(rng: np.random.Generator) -> None:
    moving, fixed = _smooth(rng), _smooth(rng)
    for factor in (1, 4):
        flow = np.zeros((3, *(n // factor for n in SHAPE)), np.float32)
        assert fused_ncc_score(moving, fixed, flow, factor) == pytest.approx(ncc(moving, fixed), abs=1e-12)


def test_fused_identical_images_score_one(rng: np.random.Generator) -> None:
    moving = _smooth(rng)
    n = moving.size
    score = fused_ncc_score(moving, moving, np.zeros((3, 8, 4, 6), np.float32), 4)
    assert score == pytest.approx((n - 1) / n, abs=1e-12)


def test_fused_constant_warped_image_scores_zero(rng: np.random.Generator) -> None:
    moving, fixed = _smooth(rng), _smooth(rng)
    outside = np.full((3, 4, 2, 3), 100.0, np.float32)  # everything sampled outside: warped image is all zeros
    assert fused_ncc_score(moving, fixed, outside, 8) == 0.0
    constant = np.full(SHAPE, 0.3, np.float32)
    assert fused_ncc_score(constant, fixed, np.zeros((3, 4, 2, 3), np.float32), 8) == 0.0
    assert fused_ncc_score(moving, constant, np.zeros((3, 4, 2, 3), np.float32), 8) == 0.0


def test_scores_do_not_depend_on_thread_count(rng: np.random.Generator) -> None:
    numba = pytest.importorskip("numba")
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs at least 2 numba threads")
    moving, fixed = _smooth(rng), _smooth(rng)
    flow = (rng.standard_normal((3, 16, 8, 12)) * 2.0).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        many = (fused_ncc_score(moving, fixed, flow, 2), ncc(moving, fixed))
        numba.set_num_threads(1)
        one = (fused_ncc_score(moving, fixed, flow, 2), ncc(moving, fixed))
    finally:
        numba.set_num_threads(before)
    assert many == one  # partial sums are added in a fixed order


def test_fused_converts_inputs(rng: np.random.Generator) -> None:
    moving, fixed = _smooth(rng), _smooth(rng)
    flow = rng.standard_normal((3, 16, 8, 12))
    expected = fused_ncc_score(moving, fixed, flow.astype(np.float32), 2)
    assert fused_ncc_score(moving.astype(np.float64), np.asfortranarray(fixed), flow, 2) == expected


def test_fused_argument_errors() -> None:
    m = np.zeros((16, 8, 24), np.float32)
    flow = np.zeros((3, 8, 4, 12), np.float32)
    with pytest.raises(ValueError, match=r"fused_ncc_score\(\) 'flow' must have shape \(3, 4, 2, 6\), got \(3, 8, 4, 12\)"):
        fused_ncc_score(m, m, flow, 4)
    with pytest.raises(ValueError, match=r"fused_ncc_score\(\) 'fixed' must have shape \(16, 8, 24\), got \(16, 8, 12\)"):
        fused_ncc_score(m, m[:, :, :12], flow, 2)
    with pytest.raises(ValueError, match=r"fused_ncc_score\(\) 'moving' shape \(16, 8, 24\) must be divisible by 'factor' 16"):
        fused_ncc_score(m, m, flow, 16)
    with pytest.raises(ValueError, match=r"fused_ncc_score\(\) 'moving' must have shape \(X, Y, Z\), got \(1, 16, 8, 24\)"):
        fused_ncc_score(m[None], m[None], flow, 2)
    with pytest.raises(ValueError, match=r"fused_ncc_score\(\) 'factor' must be a positive integer, got -2"):
        fused_ncc_score(m, m, flow, -2)
    with pytest.raises(TypeError, match=r"fused_ncc_score\(\) 'factor' must be a positive integer, got '2'"):
        fused_ncc_score(m, m, flow, "2")  # type: ignore[arg-type]
