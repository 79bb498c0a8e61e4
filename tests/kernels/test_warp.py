"""CPU (numba) warp and compose of :mod:`iirp.kernels` against analytic cases and ``grid_sample``.

Shapes are non-cubic so a swapped or flipped axis cannot pass. Conventions:
``warp(src, u)(p) = src(p + u(p))``, component c along array axis c, trilinear,
align_corners=True, zero padding (see :mod:`iirp.runtime.geometry`).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iirp.kernels import compose, warp
from iirp.kernels.warp import warp_rows

#: vs a float64 grid_sample on the same float32 inputs: float32 blending only.
F64_ATOL = 2e-6
#: vs the float32 torch reference, whose normalised grid round trip costs ~1 ulp of the coordinate.
TORCH_ATOL = 1e-5


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _rand(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _grid_sample64(src: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """float64 ``grid_sample(align_corners=True, zeros)`` of float32 ``src`` (C, X, Y, Z) at ``p + flow``."""
    torch = pytest.importorskip("torch")
    from torch.nn import functional as F

    shape = src.shape[1:]
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    coords = idx + flow.astype(np.float64)
    norm = coords * np.array([2.0 / (n - 1) for n in shape]).reshape(3, 1, 1, 1) - 1.0
    grid = torch.from_numpy(np.ascontiguousarray(norm.transpose(1, 2, 3, 0)[..., ::-1]))[None]
    out = F.grid_sample(torch.from_numpy(src.astype(np.float64))[None], grid, mode="bilinear",
                        padding_mode="zeros", align_corners=True)
    return out[0].numpy()


def _torch_warp(src: np.ndarray, flow: np.ndarray) -> np.ndarray:
    torch = pytest.importorskip("torch")
    from iirp.model import spatial

    return spatial.warp(torch.from_numpy(src)[None], torch.from_numpy(flow)[None])[0].numpy()


def _shift(src: np.ndarray, vec: tuple[int, int, int]) -> np.ndarray:
    """Hand reference: ``out[p] = src[p + vec]`` where inside, else 0 (src (C, X, Y, Z))."""
    out = np.zeros_like(src)
    dst, srcs = [slice(None)], [slice(None)]
    for n, s in zip(src.shape[1:], vec):
        dst.append(slice(min(max(-s, 0), n), max(min(n - s, n), 0)))
        srcs.append(slice(min(max(s, 0), n), max(min(n + s, n), 0)))
    out[tuple(dst)] = src[tuple(srcs)]
    return out


# --------------------------------------------------------------------------- analytic


@pytest.mark.parametrize("shape", [(6, 10, 14), (16, 8, 24)])
def test_zero_flow_is_identity(rng: np.random.Generator, shape: tuple[int, int, int]) -> None:
    src = rng.random((2, *shape), dtype=np.float32)
    out = warp(src, np.zeros((3, *shape), np.float32))
    assert out.shape == src.shape and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, src)


@pytest.mark.parametrize("vec", [(1, 0, 0), (0, -2, 0), (0, 0, 3), (2, -1, 4), (-7, 0, 0)])
def test_whole_voxel_shift(rng: np.random.Generator, vec: tuple[int, int, int]) -> None:
    shape = (6, 10, 14)
    src = rng.random((3, *shape), dtype=np.float32)
    flow = np.empty((3, *shape), np.float32)
    flow[:] = np.asarray(vec, np.float32).reshape(3, 1, 1, 1)
    np.testing.assert_array_equal(warp(src, flow), _shift(src, vec))


def test_half_voxel_shift_averages_and_pads_with_zero(rng: np.random.Generator) -> None:
    shape = (4, 5, 6)
    src = rng.random(shape, dtype=np.float32)
    flow = np.zeros((3, *shape), np.float32)
    flow[2] = 0.5
    out = warp(src, flow)
    np.testing.assert_allclose(out[:, :, :-1], 0.5 * (src[:, :, :-1] + src[:, :, 1:]), rtol=0, atol=1e-7)
    np.testing.assert_allclose(out[:, :, -1], 0.5 * src[:, :, -1], rtol=0, atol=1e-7)  # far corner outside


def test_single_volume_keeps_its_shape(rng: np.random.Generator) -> None:
    shape = (16, 8, 24)
    src = rng.random(shape, dtype=np.float32)
    flow = _rand(rng, (3, *shape), 2.0)
    out = warp(src, flow)
    assert out.shape == shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, warp(src[None], flow)[0])


def test_flow_far_outside_gives_zeros(rng: np.random.Generator) -> None:
    shape = (6, 10, 14)
    src = rng.random((2, *shape), dtype=np.float32) + 1.0
    for vec in [(6.0, 0, 0), (0, -10.0, 0), (0, 0, 1e9), (np.inf, 0, 0), (np.nan, 0, 0)]:
        flow = np.empty((3, *shape), np.float32)
        flow[:] = np.asarray(vec, np.float32).reshape(3, 1, 1, 1)
        np.testing.assert_array_equal(warp(src, flow), 0.0)


# --------------------------------------------------------------------------- against grid_sample


@pytest.mark.parametrize("shape,channels,scale", [((6, 10, 14), 2, 3.0), ((16, 8, 24), 5, 1.5), ((16, 8, 24), 1, 12.0)])
def test_matches_grid_sample(rng: np.random.Generator, shape, channels: int, scale: float) -> None:
    src = rng.random((channels, *shape), dtype=np.float32)
    flow = _rand(rng, (3, *shape), scale)  # scale 12: most samples partly or fully outside
    out = warp(src, flow)
    np.testing.assert_allclose(out, _grid_sample64(src, flow), rtol=0, atol=F64_ATOL)
    np.testing.assert_allclose(out, _torch_warp(src, flow), rtol=0, atol=TORCH_ATOL)


def test_non_float32_and_non_contiguous_inputs_are_converted(rng: np.random.Generator) -> None:
    shape = (6, 10, 14)
    src64 = rng.random((2, *shape))
    flow = _rand(rng, (3, *shape), 2.0)
    expected = warp(src64.astype(np.float32), flow)
    np.testing.assert_array_equal(warp(src64, flow), expected)
    flow_t = np.ascontiguousarray(flow.transpose(0, 3, 2, 1)).transpose(0, 3, 2, 1)  # same values, F-ordered axes
    assert not flow_t.flags.c_contiguous
    np.testing.assert_array_equal(warp(src64, flow_t), expected)


def test_out_is_written_and_reused(rng: np.random.Generator) -> None:
    shape = (6, 10, 14)
    src = rng.random((2, *shape), dtype=np.float32)
    out = np.full((2, *shape), 7.0, np.float32)
    for scale in (1.0, 4.0):
        flow = _rand(rng, (3, *shape), scale)
        result = warp(src, flow, out=out)
        assert result is out
        np.testing.assert_array_equal(out, warp(src, flow))


# --------------------------------------------------------------------------- compose


def test_compose_matches_torch_and_warp_plus_du(rng: np.random.Generator) -> None:
    torch = pytest.importorskip("torch")
    from iirp.model import spatial

    shape = (16, 8, 24)
    phi = _rand(rng, (3, *shape), 2.0)
    du = _rand(rng, (3, *shape), 3.0)
    out = compose(phi, du)
    assert out.shape == (3, *shape) and out.dtype == np.float32
    np.testing.assert_array_equal(out, warp(phi, du) + du)
    ref = spatial.compose(torch.from_numpy(phi)[None], torch.from_numpy(du)[None])[0].numpy()
    # values reach ~10 voxels here; the torch reference rounds its coordinates through [-1, 1]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=TORCH_ATOL)


def test_compose_with_zero_is_identity(rng: np.random.Generator) -> None:
    shape = (6, 10, 14)
    phi = _rand(rng, (3, *shape), 2.0)
    zero = np.zeros_like(phi)
    np.testing.assert_array_equal(compose(phi, zero), phi)
    np.testing.assert_array_equal(compose(zero, phi), phi)


def test_compose_with_out(rng: np.random.Generator) -> None:
    shape = (6, 10, 14)
    phi, du = _rand(rng, (3, *shape)), _rand(rng, (3, *shape))
    out = np.empty((3, *shape), np.float32)
    assert compose(phi, du, out=out) is out
    np.testing.assert_array_equal(out, warp(phi, du) + du)


# --------------------------------------------------------------------------- argument errors


def test_warp_argument_errors() -> None:
    src = np.zeros((5, 6, 7), np.float32)
    flow = np.zeros((3, 5, 6, 7), np.float32)
    with pytest.raises(ValueError, match=r"warp\(\) 'flow' must have shape \(3, 5, 6, 7\), got \(2, 5, 6, 7\)"):
        warp(src, np.zeros((2, 5, 6, 7), np.float32))
    with pytest.raises(ValueError, match=r"warp\(\) 'flow' must have shape \(3, 5, 6, 7\), got \(3, 5, 6, 8\)"):
        warp(src[None], np.zeros((3, 5, 6, 8), np.float32))
    with pytest.raises(ValueError, match=r"warp\(\) 'src' must have shape \(X, Y, Z\) or \(C, X, Y, Z\), got \(6, 7\)"):
        warp(src[0], flow)
    with pytest.raises(TypeError, match=r"warp\(\) 'src' must be a real-valued array, got dtype complex64"):
        warp(src.astype(np.complex64), flow)
    with pytest.raises(TypeError, match=r"warp\(\) 'flow' must be a real-valued array, got dtype object"):
        warp(src, np.array([None]))
    with pytest.raises(ValueError, match=r"warp\(\) 'out' must be a C-contiguous float32 numpy array of shape \(5, 6, 7\), got C-contiguous float64"):
        warp(src, flow, out=np.zeros((5, 6, 7)))
    with pytest.raises(ValueError, match=r"warp\(\) 'out' must be .* got C-contiguous float32 array of shape \(1, 5, 6, 7\)"):
        warp(src, flow, out=np.zeros((1, 5, 6, 7), np.float32))
    with pytest.raises(ValueError, match=r"warp\(\) 'out' must be .* got non-contiguous float32"):
        warp(src, flow, out=np.zeros((7, 6, 5), np.float32).T)
    with pytest.raises(ValueError, match=r"warp\(\) 'out' must be .* got list"):
        warp(src, flow, out=[0.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"warp\(\) 'out' must not overlap 'src'"):
        warp(src, flow, out=src)


def test_compose_argument_errors() -> None:
    phi = np.zeros((3, 5, 6, 7), np.float32)
    with pytest.raises(ValueError, match=r"compose\(\) 'du' must have shape \(3, 5, 6, 7\), got \(3, 5, 6, 6\)"):
        compose(phi, np.zeros((3, 5, 6, 6), np.float32))
    with pytest.raises(ValueError, match=r"compose\(\) 'phi' must have shape \(3, 5, 6, 7\), got \(2, 5, 6, 7\)"):
        compose(np.zeros((2, 5, 6, 7), np.float32), phi)
    with pytest.raises(ValueError, match=r"compose\(\) 'phi' must have shape \(3, X, Y, Z\), got \(5, 6, 7\)"):
        compose(phi[0], phi[0])
    with pytest.raises(ValueError, match=r"compose\(\) 'out' must not overlap 'phi'"):
        compose(phi, phi.copy(), out=phi)


@settings(max_examples=40, deadline=None)
@given(channels=st.sampled_from([1, 3, 8, 16]), start=st.integers(0, 12), length=st.integers(1, 13),
       scale=st.sampled_from([0.5, 3.0, 20.0]), seed=st.integers(0, 2**16))
def test_warp_rows_are_the_rows_of_warp_bit_for_bit(channels: int, start: int, length: int, scale: float,
                                                    seed: int) -> None:
    """Any row range, channel count (both warp paths) and flow size, inside and far outside the volume."""
    rng = np.random.default_rng(seed)
    shape = (13, 7, 5)
    stop = min(shape[0], start + length)
    src, flow = _rand(rng, (channels, *shape)), _rand(rng, (3, *shape), scale)
    got = warp_rows(src, flow, start, stop)
    assert got.shape == (channels, stop - start, *shape[1:]) and got.dtype == np.float32
    np.testing.assert_array_equal(got, warp(src, flow)[:, start:stop])


def test_warp_rows_of_one_volume_and_into_out(rng: np.random.Generator) -> None:
    src, flow = _rand(rng, (9, 6, 4)), _rand(rng, (3, 9, 6, 4), 2.0)
    np.testing.assert_array_equal(warp_rows(src, flow, 2, 5), warp(src, flow)[2:5])
    out = np.full((3, 6, 4), np.nan, np.float32)
    assert warp_rows(src, flow, 6, 9, out=out) is out
    np.testing.assert_array_equal(out, warp(src, flow)[6:9])


@pytest.mark.parametrize(("start", "stop"), [(-1, 3), (3, 3), (4, 2), (0, 10)])
def test_warp_rows_refuses_rows_outside_the_volume(rng: np.random.Generator, start: int, stop: int) -> None:
    src, flow = _rand(rng, (2, 9, 6, 4)), _rand(rng, (3, 9, 6, 4))
    with pytest.raises(ValueError, match="warp_rows\\(\\) needs 0 <= x_start < x_stop <= 9"):
        warp_rows(src, flow, start, stop)


def test_warp_rows_checks_out(rng: np.random.Generator) -> None:
    src, flow = _rand(rng, (2, 9, 6, 4)), _rand(rng, (3, 9, 6, 4))
    with pytest.raises(ValueError, match="'out' must be a C-contiguous float32 numpy array of shape"):
        warp_rows(src, flow, 0, 3, out=np.empty((2, 9, 6, 4), np.float32))
