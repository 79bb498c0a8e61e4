"""The CUDA kernel sources compiled as host C++ (tests/cudahost) against the numba kernels, without a GPU.

Every ``.cu`` file of ``iirp/kernels/cuda`` is built, unmodified, with g++
through ``tests/cudahost/host_shim.h`` (one fiber per CUDA thread, real
``__syncthreads`` barriers, ``__shared__`` one per block, exact fp16
conversions in place of the PTX ones). The public :mod:`iirp.kernels.cuda_ops`
functions then run unchanged on those kernels (:class:`cudahost.device.HostDevice`
stands in for ``cuda_build``'s device layer), so their checks, grid
(``ceil_div(n, 256)``), block size and argument lists are exercised too.

Expected agreement, per kernel instantiation:

* ``iirp_warp<float>``, ``iirp_compose``, ``iirp_upsample``: bit for bit the
  numba :func:`iirp.kernels.warp`, :func:`~iirp.kernels.compose`,
  :func:`~iirp.kernels.upsample` (same float32 operations in the same order;
  g++ with ``-ffp-contract=off``, SSE math). NaNs compare as NaN, every other
  value by its bits (so ``-0.0 != 0.0``).
* ``iirp_warp<iirp_half>``: bit for bit ``warp(src16 -> float32, flow)`` rounded
  once to float16 (the kernel blends in float32 and rounds on store).
* ``iirp_warp_nearest<int|short|unsigned char>``: equal to a numpy reference of
  ITK's nearest-neighbour rule (round half up, inside iff ``-1/2 <= t < n - 1/2``).
* ``iirp_score_partials`` + ``iirp_score_sum``: the per-block rows and the five
  sums bit for bit a numpy replay of the kernels' fixed addition tree over the
  per-voxel float64 terms of ``warp(moving, upsample(flow))``; the sums within
  the rigorous summation bound of the exactly rounded sum (:func:`math.fsum`);
  the finished NCC within :data:`SCORE_ATOL` of the numba
  :func:`~iirp.kernels.fused_ncc_score` (same terms, other addition order).

Shapes are non-cubic (a swapped axis cannot pass), include 1-voxel-thick axes
and partial last blocks; flows send many points outside and hold NaN, +-inf,
huge values and exact border / tie positions.
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pytest
from cudahost.build import (
    SIGNATURES,
    CompilerNotFoundError,
    HostLaunchError,
    HostLibrary,
    KernelCompileError,
    build_library,
    build_source,
    find_compiler,
)
from cudahost.device import HostArray, HostDevice, guarded_copy, guarded_empty
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iirp.kernels import compose as cpu_compose
from iirp.kernels import cuda_build, cuda_ops
from iirp.kernels import fused_ncc_score as cpu_score
from iirp.kernels import upsample as cpu_upsample
from iirp.kernels import warp as cpu_warp
from iirp.kernels.resample import warp_labels as cpu_warp_labels
from iirp.kernels.score import _ncc_from_sums

pytestmark = pytest.mark.cudahost

#: Host NCC vs the numba fused score. Both add the same float64 per-voxel terms (bit-identical,
#: checked below), in different orders: each sum then lies within (n - 1) * 2^-53 * sum|terms| of
#: the exact one (< 1e-11 relative for the <= 7e4 voxels here), and the NCC's cancellations
#: (var = saa - sa^2 / n) amplify that by about saa / var (~4 for these [0, 1] images). 1e-9 leaves
#: a wide margin and is the GPU test's tolerance (tests/kernels/test_cuda_kernels.py).
SCORE_ATOL = 1e-9
#: Unit roundoff of float64.
_U64 = 2.0**-53

#: Shapes of the warp / compose / label tests: non-cubic, 1-voxel-thick axes, partial last blocks.
SHAPES = [(5, 7, 9), (16, 24, 8), (1, 6, 5), (7, 1, 1), (3, 1, 8), (1, 1, 1)]

_HYPOTHESIS = settings(max_examples=25, deadline=None, database=None,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def libraries() -> dict[str, HostLibrary]:
    """Every kernel source built for the host (cached on disk); skips only when there is no C++ compiler."""
    try:
        find_compiler()
    except CompilerNotFoundError as err:
        pytest.skip(str(err))
    names = sorted(SIGNATURES)
    with ThreadPoolExecutor(len(names)) as pool:
        return dict(zip(names, pool.map(build_source, names)))


@pytest.fixture(scope="module")
def host(libraries: dict[str, HostLibrary]) -> Iterator[HostDevice]:
    """cuda_ops' device layer routed to the host kernels for this module."""
    with pytest.MonkeyPatch.context() as patch:
        device = HostDevice(libraries)
        device.install(patch)
        yield device


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


# ---------------------------------------------------------------------------- helpers


def assert_bits_equal(got: np.ndarray, expected: np.ndarray) -> None:
    """Same shape and dtype; NaN where expected is NaN; every other element with identical bits."""
    assert got.shape == expected.shape and got.dtype == expected.dtype, (got.shape, got.dtype, expected.dtype)
    if got.dtype.kind != "f":
        np.testing.assert_array_equal(got, expected)
        return
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg="NaN positions differ")
    uint = np.dtype(f"u{got.dtype.itemsize}")
    diff = np.flatnonzero(got.view(uint)[~nan] != expected.view(uint)[~nan])
    if diff.size:
        g, e = got[~nan][diff[:5]], expected[~nan][diff[:5]]
        raise AssertionError(f"{diff.size} of {(~nan).sum()} elements differ in their bits, e.g. {g} vs {e}")


def _out(shape: tuple[int, ...], dtype: Any) -> HostArray:
    return HostArray(guarded_empty(shape, dtype))


def _in(array: np.ndarray) -> HostArray:
    return HostArray(guarded_copy(np.ascontiguousarray(array)), readonly=True)


def _check_launch(host: HostDevice, expression: str, n: int) -> None:
    """The last launch was ``expression`` on ceil_div(n, 256) blocks of 256 threads."""
    last = host.launches[-1]
    assert (last.expression, last.grid, last.block) == (expression, -(-n // 256), 256)


def _flow(rng: np.random.Generator, shape: tuple[int, ...], scale: Optional[float] = None,
          special: bool = True) -> np.ndarray:
    """Random ``(3, *shape)`` float32 flow: many points outside, a quarter on exact quarter voxels,
    plus NaN, +-inf, huge values and points landing exactly on -1, -1/2, 0, 1/2, n - 3/2, n - 1, n - 1/2, n
    and next to some of them (0.49999997f + 0.5f rounds to 1, the trap of a naive round half up)."""
    if scale is None:
        scale = 0.6 * max(shape) + 1.5
    flow = rng.uniform(-scale, scale, (3, *shape)).astype(np.float32)
    snap = rng.random(flow.shape) < 0.25
    flow[snap] = np.round(flow[snap] * 4) / 4
    if not special:
        return flow
    idx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    flat = flow.reshape(3, -1)
    n_vox = flat.shape[1]
    for c, n in enumerate(shape):
        targets = np.array([-1.0, np.nextafter(np.float32(-1), np.float32(0)), -0.5, -0.50000006, 0.0, 0.5,
                            0.49999997, n - 1.5, n - 1, n - 0.5, n, np.nextafter(np.float32(n), np.float32(0))],
                           np.float32)
        picks = rng.choice(n_vox, size=min(n_vox, 2 * targets.size), replace=False)
        for k, v in enumerate(picks):
            flat[c, v] = targets[k % targets.size] - idx[c].reshape(-1)[v]
    values = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 3e38, -0.0, 1e-8, -1e-8], np.float32)
    picks = rng.choice(n_vox, size=min(n_vox, values.size), replace=False)
    for k, v in enumerate(picks):
        flat[k % 3, v] = values[k]
    return flow


# ------------------------------------------------------------------------ the builder


def test_every_kernel_instantiation_has_a_host_launcher(libraries: dict[str, HostLibrary]) -> None:
    assert {name: tuple(k) for name, k in SIGNATURES.items()} == cuda_build.KERNELS
    for name, library in libraries.items():
        assert set(library.kernels) == set(cuda_build.KERNELS[name])
        assert library.path.is_file() and library.name == name


def test_kernel_sources_compile_without_warnings(libraries: dict[str, HostLibrary]) -> None:
    for library in libraries.values():
        assert library.log == "", f"{library.name} (host, -Wall -Wextra):\n{library.log}"


def test_launch_configuration_matches_the_kernels() -> None:
    # cuda_ops launches 256-thread blocks: each kernel's __launch_bounds__ must allow them (a GPU refuses
    # a larger block; the host shim ignores launch bounds, so check them here)
    for name in cuda_build.KERNELS:
        text = cuda_build.source_text(name)
        bounds = re.findall(r"__launch_bounds__\((\w+)\)", text)
        assert bounds, name
        for bound in bounds:
            if bound == "IIRP_SCORE_BLOCK":
                value = int(re.search(r"#define IIRP_SCORE_BLOCK (\d+)", text).group(1))
                assert value == cuda_ops._SCORE_BLOCK, name
            else:
                assert int(bound) == cuda_ops._BLOCK, name


def test_missing_compiler_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(CompilerNotFoundError, match=r"no host C\+\+ compiler found \(tried no-such-compiler-xyz\)"):
        find_compiler()


def test_compile_error_carries_the_compiler_log(tmp_path: Path) -> None:
    (tmp_path / "bad.cu").write_text("__global__ void k(float* out) { out[0] = undeclared_name; }\n")
    with pytest.raises(KernelCompileError, match=r"host build of bad.cu failed") as info:
        build_library(tmp_path / "bad.cu", {"k": ("float*",)}, fp16_helpers=False, cache_dir=tmp_path / "cache")
    assert "undeclared_name" in info.value.log


def test_builds_are_cached_by_content(tmp_path: Path) -> None:
    source = tmp_path / "k.cu"
    source.write_text("__global__ void k(float* out) { out[threadIdx.x] = 1.0f; }\n")
    first = build_library(source, {"k": ("float*",)}, fp16_helpers=False, cache_dir=tmp_path)
    assert build_library(source, {"k": ("float*",)}, fp16_helpers=False, cache_dir=tmp_path).path == first.path
    source.write_text("__global__ void k(float* out) { out[threadIdx.x] = 2.0f; }\n")
    assert build_library(source, {"k": ("float*",)}, fp16_helpers=False, cache_dir=tmp_path).path != first.path


def test_launcher_checks_its_arguments(libraries: dict[str, HostLibrary]) -> None:
    kernel = libraries["upsample.cu"].kernels["iirp_upsample"]
    a, b = guarded_empty((3, 1, 1, 1), np.float32), guarded_empty((3, 1, 1, 1), np.float32)
    ptrs = (a.ctypes.data, b.ctypes.data)
    with pytest.raises(TypeError, match=r"iirp_upsample takes 6 arguments"):
        kernel(1, 256, *ptrs, np.int32(1))
    with pytest.raises(TypeError, match=r"iirp_upsample argument 2 \(int\) must be np.int32, got int"):
        kernel(1, 256, *ptrs, 1, np.int32(1), np.int32(1), np.int32(1))
    with pytest.raises(TypeError, match=r"argument 1 \(float\*\) must be an address"):
        kernel(1, 256, ptrs[0], np.int32(5), *(np.int32(1),) * 4)
    with pytest.raises(HostLaunchError, match=r"invalid launch configuration: grid 1, block 2000"):
        kernel(1, 2000, *ptrs, *(np.int32(1),) * 4)


# -------------------------------------------------------------------- the shim itself

_BARRIER_KERNELS = r"""
// Reverse each block of 256 ints through shared memory: needs the barrier.
__global__ void reverse_blocks(const int* __restrict__ in, int* __restrict__ out)
{
    __shared__ int tile[256];
    const int t = threadIdx.x;
    const int base = blockIdx.x * blockDim.x;
    tile[t] = in[base + t];
    __syncthreads();
    out[base + t] = tile[blockDim.x - 1 - t] + 1000 * (int)gridDim.x;
}

// Some threads skip the barrier: undefined in CUDA, an error here.
__global__ void early_exit(int* out)
{
    if (threadIdx.x < 10) {
        return;
    }
    __syncthreads();
    out[threadIdx.x] = 1;
}

// Threads wait at two different barriers: undefined in CUDA, an error here.
__global__ void split_barrier(int* out)
{
    if (threadIdx.x % 2 == 0) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}
"""


@pytest.fixture(scope="module")
def barrier_library(libraries: dict[str, HostLibrary], tmp_path_factory: pytest.TempPathFactory) -> HostLibrary:
    folder = tmp_path_factory.mktemp("barrier")
    (folder / "barrier.cu").write_text(_BARRIER_KERNELS)
    kernels = {"reverse_blocks": ("const int*", "int*"), "early_exit": ("int*",), "split_barrier": ("int*",)}
    return build_library(folder / "barrier.cu", kernels, fp16_helpers=False, cache_dir=folder)


def test_syncthreads_is_a_block_barrier_and_shared_memory_is_per_block(barrier_library: HostLibrary) -> None:
    values = guarded_copy(np.arange(3 * 256, dtype=np.int32))
    out = guarded_empty((3 * 256,), np.int32)
    barrier_library.kernels["reverse_blocks"](3, 256, values.ctypes.data, out.ctypes.data)
    expected = np.arange(3 * 256, dtype=np.int32).reshape(3, 256)[:, ::-1].reshape(-1) + 3000
    np.testing.assert_array_equal(out, expected)


def test_divergent_barriers_are_reported(barrier_library: HostLibrary) -> None:
    out = guarded_empty((256,), np.int32)
    with pytest.raises(HostLaunchError, match=r"block 0: 10 of 256 threads returned while the others wait"):
        barrier_library.kernels["early_exit"](1, 256, out.ctypes.data)
    with pytest.raises(HostLaunchError, match=r"block 0: threads wait at different __syncthreads\(\)"):
        barrier_library.kernels["split_barrier"](1, 256, out.ctypes.data)


# ------------------------------------------------------------------------------- fp16


def _float_to_half_cases(rng: np.random.Generator) -> np.ndarray:
    """float32 inputs for the float -> half rounding: every half, every tie between neighbouring halves and
    the floats either side of it, the overflow and underflow edges, NaNs and infinities, random bit patterns."""
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.sort(np.unique(halves[np.isfinite(halves)].astype(np.float64)))
    ties = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)  # 12 significant bits: exact in float32
    assert np.array_equal(ties.astype(np.float64), (finite[:-1] + finite[1:]) / 2)
    up, down = np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf))
    edges = np.array([65504, 65519.996, 65520, 65536, 1e30, 3.4028235e38, 2**-24, 2**-25, 3 * 2**-25, 2**-14,
                      1e-45, 2**-26, 0.0, -0.0, np.inf, -np.inf], np.float32)
    edges = np.concatenate([edges, -edges, np.nextafter(edges, np.float32(0))])
    nans = np.array([0x7FC00000, 0x7F800001, 0xFFC00000, 0x7FFFFFFF, 0xFF800001, 0x7F802000],
                    np.uint32).view(np.float32)
    random_bits = rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    in_range = (rng.integers(100 << 23, 143 << 23, 1 << 20, dtype=np.uint64).astype(np.uint32)
                | (rng.integers(0, 2, 1 << 20).astype(np.uint32) << 31)).view(np.float32)
    return np.concatenate([halves.astype(np.float32), ties, up, down, edges, nans, random_bits, in_range])


def test_fp16_host_conversions_match_numpy(libraries: dict[str, HostLibrary], rng: np.random.Generator) -> None:
    library = libraries["warp.cu"]  # the conversions iirp_warp<iirp_half> is built with
    # half -> float, every half: exact (NaN becomes the canonical float NaN)
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = library.half_to_float(bits)
    assert_bits_equal(got, bits.view(np.float16).astype(np.float32))
    assert np.all(got.view(np.uint32)[np.isnan(got)] == 0x7FFFFFFF)
    # float -> half: round to nearest even, subnormals kept, overflow to inf (NaN: canonical 0x7fff)
    values = _float_to_half_cases(rng)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = values.astype(np.float16)
    got16 = library.float_to_half(values).view(np.float16)
    assert_bits_equal(got16, expected)
    assert np.all(got16.view(np.uint16)[np.isnan(got16)] == 0x7FFF)


# ------------------------------------------------------------------------------- warp


def _host_warp(host: HostDevice, src: np.ndarray, flow: np.ndarray) -> np.ndarray:
    out = _out(src.shape, src.dtype)
    assert cuda_ops.warp(_in(src), _in(flow), out=out) is out
    expression = "iirp_warp<float>" if src.dtype == np.float32 else "iirp_warp<iirp_half>"
    _check_launch(host, expression, int(np.prod(src.shape[-3:])))
    return out.array


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels", [None, 1, 4])
def test_warp_float32(host: HostDevice, rng: np.random.Generator, shape: tuple[int, ...],
                      channels: Optional[int]) -> None:
    src = rng.standard_normal(shape if channels is None else (channels, *shape)).astype(np.float32)
    specials = np.array([np.inf, -np.inf, np.nan, -0.0], np.float32)  # IEEE propagation through the blend
    src.reshape(-1)[-min(src.size, specials.size):] = specials[: min(src.size, specials.size)]
    for flow in (_flow(rng, shape), _flow(rng, shape, scale=1.0), np.zeros((3, *shape), np.float32)):
        assert_bits_equal(_host_warp(host, src, flow), cpu_warp(src, flow))


@pytest.mark.parametrize("shape", SHAPES)
def test_warp_float16_storage(host: HostDevice, rng: np.random.Generator, shape: tuple[int, ...]) -> None:
    src = (rng.standard_normal((3, *shape)) * 1000).astype(np.float16)
    specials = np.array([65504, -65504, 6e-8, -6e-8, 1e-5, np.inf, np.nan, -0.0], np.float16)
    src.reshape(-1)[: min(src.size, specials.size)] = specials[: min(src.size, specials.size)]
    for flow in (_flow(rng, shape), _flow(rng, shape, scale=1.0)):
        expected = cpu_warp(src.astype(np.float32), flow).astype(np.float16)  # float32 blend, one rounding
        assert_bits_equal(_host_warp(host, src, flow), expected)


@given(shape=st.tuples(*[st.integers(1, 7)] * 3), channels=st.integers(1, 3), seed=st.integers(0, 2**32 - 1),
       half=st.booleans(), special=st.booleans())
@_HYPOTHESIS
def test_warp_random_shapes(host: HostDevice, shape: tuple[int, int, int], channels: int, seed: int, half: bool,
                            special: bool) -> None:
    rng = np.random.default_rng(seed)
    src = rng.standard_normal((channels, *shape)).astype(np.float16 if half else np.float32)
    flow = _flow(rng, shape, special=special)
    expected = cpu_warp(src, flow)
    assert_bits_equal(_host_warp(host, src, flow), expected.astype(np.float16) if half else expected)


# ----------------------------------------------------------------------------- compose


def _host_compose(host: HostDevice, phi: np.ndarray, du: np.ndarray) -> np.ndarray:
    out = _out(phi.shape, np.float32)
    assert cuda_ops.compose(_in(phi), _in(du), out=out) is out
    _check_launch(host, "iirp_compose", int(np.prod(phi.shape[1:])))
    return out.array


@pytest.mark.parametrize("shape", SHAPES)
def test_compose(host: HostDevice, rng: np.random.Generator, shape: tuple[int, ...]) -> None:
    phi = _flow(rng, shape, scale=2.0)
    for du in (_flow(rng, shape), _flow(rng, shape, scale=1.0), np.zeros((3, *shape), np.float32)):
        assert_bits_equal(_host_compose(host, phi, du), cpu_compose(phi, du))


@given(shape=st.tuples(*[st.integers(1, 6)] * 3), seed=st.integers(0, 2**32 - 1))
@_HYPOTHESIS
def test_compose_random_shapes(host: HostDevice, shape: tuple[int, int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    phi, du = _flow(rng, shape, scale=3.0), _flow(rng, shape)
    assert_bits_equal(_host_compose(host, phi, du), cpu_compose(phi, du))


# ---------------------------------------------------------------------------- upsample


def _host_upsample(host: HostDevice, flow: np.ndarray, factor: int) -> np.ndarray:
    fine = (3, *(factor * n for n in flow.shape[1:]))
    out = _out(fine, np.float32)
    assert cuda_ops.upsample(_in(flow), factor, out=out) is out
    _check_launch(host, "iirp_upsample", int(np.prod(fine[1:])))
    return out.array


@pytest.mark.parametrize("factor", range(1, 9))
@pytest.mark.parametrize("shape", [(2, 3, 4), (5, 7, 9), (1, 3, 2), (3, 1, 1)])
def test_upsample(host: HostDevice, rng: np.random.Generator, factor: int, shape: tuple[int, ...]) -> None:
    flow = _flow(rng, shape, scale=4.0, special=False)
    assert_bits_equal(_host_upsample(host, flow, factor), cpu_upsample(flow, factor))


def test_upsample_special_values(host: HostDevice, rng: np.random.Generator) -> None:
    flow = _flow(rng, (4, 5, 3))  # NaN and infinities spread through the blends
    for factor in (1, 2, 3):
        assert_bits_equal(_host_upsample(host, flow, factor), cpu_upsample(flow, factor))


def test_upsample2(host: HostDevice, rng: np.random.Generator) -> None:
    flow = _flow(rng, (3, 4, 5), special=False)
    out = _out((3, 6, 8, 10), np.float32)
    assert cuda_ops.upsample2(_in(flow), out=out) is out
    assert_bits_equal(out.array, cpu_upsample(flow, 2))


@given(shape=st.tuples(*[st.integers(1, 5)] * 3), factor=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
@_HYPOTHESIS
def test_upsample_random_shapes(host: HostDevice, shape: tuple[int, int, int], factor: int, seed: int) -> None:
    flow = _flow(np.random.default_rng(seed), shape, scale=5.0, special=False)
    assert_bits_equal(_host_upsample(host, flow, factor), cpu_upsample(flow, factor))


# ------------------------------------------------------------------------------ labels


def _itk_nearest(labels: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """ITK's nearest-neighbour rule on the index grid, computed independently of the kernel's arithmetic.

    The sample point ``t = index + flow`` is formed in float64 (exact, as ITK's double arithmetic is on an
    index grid); then the nearest index is ``floor(t + 1/2)`` (round half up) and the point is inside iff that index is in
    ``[0, n)`` on every axis, i.e. ``-1/2 <= t < n - 1/2``; NaN and infinities are outside (label 0).
    """
    idx = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in labels.shape], indexing="ij")
    inside = np.ones(labels.shape, bool)
    nearest = []
    with np.errstate(invalid="ignore"):
        for c, n in enumerate(labels.shape):
            t = idx[c] + flow[c].astype(np.float64)  # exact
            r = np.floor(np.where(np.isfinite(t), t, -1.0) + 0.5)
            inside &= (r >= 0) & (r < n)
            nearest.append(np.clip(r, 0, n - 1).astype(np.int64))
    return np.where(inside, labels[nearest[0], nearest[1], nearest[2]], 0).astype(labels.dtype)


_LABEL_TYPES = {np.int32: "int", np.int16: "short", np.uint8: "unsigned char"}


def _host_labels(host: HostDevice, labels: np.ndarray, flow: np.ndarray) -> np.ndarray:
    out = _out(labels.shape, labels.dtype)
    assert cuda_ops.warp_labels(_in(labels), _in(flow), out=out) is out
    _check_launch(host, f"iirp_warp_nearest<{_LABEL_TYPES[labels.dtype.type]}>", labels.size)
    return out.array


def _labels(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    info = np.iinfo(dtype)
    labels = rng.integers(max(info.min, -3000), min(info.max, 3000), shape, endpoint=True).astype(dtype)
    flat = labels.reshape(-1)
    flat[0], flat[-1] = info.max, max(info.min, 1)  # extremes are copied unchanged (0 is the background)
    return labels


@pytest.mark.parametrize("dtype", list(_LABEL_TYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_warp_labels(host: HostDevice, rng: np.random.Generator, dtype: Any, shape: tuple[int, ...]) -> None:
    labels = _labels(rng, shape, dtype)
    halves = (np.round(rng.uniform(-4, 4, (3, *shape)) * 2) / 2).astype(np.float32)  # exact .5 ties
    near_ties = (halves + rng.choice([-1, 1], halves.shape) * np.float32(2**-24)).astype(np.float32)
    for flow in (_flow(rng, shape), halves, near_ties):
        expected = _itk_nearest(labels, flow)
        assert_bits_equal(_host_labels(host, labels, flow), expected)
        assert_bits_equal(cpu_warp_labels(labels, flow), expected)  # the numba twin, same rule


def test_warp_labels_rounding_by_hand(host: HostDevice) -> None:
    labels = np.arange(1, 6, dtype=np.int32).reshape(5, 1, 1)  # label = x + 1 along x (n = 5)
    at_zero = {0.5: 2, 0.49999997: 1, -0.5: 1, -0.50000006: 0, 1.5: 3, 4.4999995: 5, 4.5: 0,
               np.nan: 0, np.inf: 0, -np.inf: 0}  # sample point of voxel 0 -> its label
    for target, expected in at_zero.items():
        flow = np.zeros((3, 5, 1, 1), np.float32)
        flow[0, 0] = np.float32(target)
        assert _host_labels(host, labels, flow).reshape(-1).tolist() == [expected, 2, 3, 4, 5], target
        assert cpu_warp_labels(labels, flow).reshape(-1).tolist() == [expected, 2, 3, 4, 5], target
    # the sample point is formed exactly: 2 + 0.49999997f is 2.49999997 (-> index 2), although the float32
    # sum would round onto the tie 2.5 (-> index 3); likewise 3 - 0.50000006f is 2.49999994 (-> index 2)
    for voxel, target in ((2, 0.49999997), (3, -0.50000006)):
        flow = np.zeros((3, 5, 1, 1), np.float32)
        flow[0, voxel] = np.float32(target)
        assert np.float32(voxel) + np.float32(target) == np.float32(2.5)  # what a float32 sum would round to
        expected = [1, 2, 3, 4, 5]
        expected[voxel] = 3
        assert _host_labels(host, labels, flow).reshape(-1).tolist() == expected, (voxel, target)
        assert cpu_warp_labels(labels, flow).reshape(-1).tolist() == expected, (voxel, target)


@given(shape=st.tuples(*[st.integers(1, 7)] * 3), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from(list(_LABEL_TYPES)))
@_HYPOTHESIS
def test_warp_labels_random_shapes(host: HostDevice, shape: tuple[int, int, int], seed: int, dtype: Any) -> None:
    rng = np.random.default_rng(seed)
    labels, flow = _labels(rng, shape, dtype), _flow(rng, shape)
    assert_bits_equal(_host_labels(host, labels, flow), _itk_nearest(labels, flow))


# ------------------------------------------------------------------------------- score


def _tree(values: np.ndarray) -> np.ndarray:
    """score.cu ``iirp_block_sum5`` on ``(5, rows, 256)`` float64: ``sh[t] += sh[t + stride]`` for
    stride 128, 64, ..., 1; returns ``sh[:, :, 0]``."""
    sh = values.copy()
    stride = sh.shape[-1] // 2
    while stride > 0:
        sh[..., :stride] = sh[..., :stride] + sh[..., stride: 2 * stride]
        stride //= 2
    return sh[..., 0]


def _score_replay(moving: np.ndarray, fixed: np.ndarray, flow: np.ndarray, factor: int,
                  block: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The score kernels' arithmetic replayed in numpy on the numba per-voxel terms.

    Terms per voxel (float64): a, b, a*a, b*b, a*b with ``a = warp(moving, upsample(flow))`` where the
    sample point has a corner inside, else a contributes nothing, and ``b = fixed``.

    Returns:
        ``(rows, sums, terms)``: the per-block rows ``(blocks, 5)`` of ``iirp_score_partials``, the five
        sums of ``iirp_score_sum`` (thread t adds rows t, t + 256, ... serially, then the tree) and the
        ``(5, n)`` terms.
    """
    up = cpu_upsample(flow, factor)
    a = cpu_warp(moving, up).astype(np.float64).reshape(-1)
    b = fixed.astype(np.float64).reshape(-1)
    idx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in moving.shape], indexing="ij")
    inside = np.ones(moving.shape, bool)
    with np.errstate(invalid="ignore"):
        for c, n in enumerate(moving.shape):
            p = idx[c] + up[c]  # float32, as the kernel
            inside &= (p > np.float32(-1)) & (p < np.float32(n))
    inside = inside.reshape(-1)
    n = a.size
    blocks = -(-n // block)
    terms = np.zeros((5, blocks * block))
    terms[0, :n] = np.where(inside, a, 0.0)
    terms[1, :n] = b
    terms[2, :n] = np.where(inside, a * a, 0.0)
    terms[3, :n] = b * b
    terms[4, :n] = np.where(inside, a * b, 0.0)
    rows = _tree(terms.reshape(5, blocks, block)).T
    serial = np.zeros((5, block))
    for start in range(0, blocks, block):
        chunk = rows[start: start + block].T
        serial[:, : chunk.shape[1]] = serial[:, : chunk.shape[1]] + chunk
    sums = _tree(serial[:, None, :])[:, 0]
    return rows, sums, terms[:, :n]


def _host_score(host: HostDevice, moving: np.ndarray, fixed: np.ndarray, flow: np.ndarray,
                factor: int) -> tuple[float, np.ndarray, np.ndarray]:
    """cuda_ops.fused_ncc_score on the host kernels: (ncc, per-block rows, sums) read from its scratch buffer."""
    before = len(host.launches)
    score = cuda_ops.fused_ncc_score(_in(moving), _in(fixed), _in(flow), factor)
    assert isinstance(score, float)
    n, blocks = moving.size, -(-moving.size // 256)
    partials, total = host.launches[before:]
    assert (partials.expression, partials.grid, partials.block) == ("iirp_score_partials", blocks, 256)
    assert (total.expression, total.grid, total.block) == ("iirp_score_sum", 1, 256)
    assert total.args[1] == np.int32(blocks) and n == int(np.prod(moving.shape))
    scratch = host.scratch[-1].view(np.float64)  # the workspace is reused and only grows: find the rows in it
    base = scratch.ctypes.data
    rows_at, sums_at = (int(partials.args[3]) - base) // 8, (int(total.args[2]) - base) // 8
    assert rows_at == 0 and int(total.args[0]) == int(partials.args[3]) and sums_at >= 5 * blocks
    assert sums_at + 5 <= scratch.size
    return score, scratch[: 5 * blocks].reshape(blocks, 5).copy(), scratch[sums_at: sums_at + 5].copy()


def _check_score(host: HostDevice, moving: np.ndarray, fixed: np.ndarray, flow: np.ndarray, factor: int) -> None:
    score, rows, sums = _host_score(host, moving, fixed, flow, factor)
    expected_rows, expected_sums, terms = _score_replay(moving, fixed, flow, factor)
    assert_bits_equal(rows, expected_rows)
    assert_bits_equal(sums, expected_sums)
    n = moving.size
    for k in range(5):  # any addition order: |computed - exact| <= (n - 1) u sum|x| (to first order)
        exact = math.fsum(terms[k])
        assert abs(sums[k] - exact) <= (n - 1) * _U64 * float(np.abs(terms[k]).sum()) * (1 + 1e-6)
    assert score == _ncc_from_sums(n, *(float(s) for s in sums))
    assert score == pytest.approx(cpu_score(moving, fixed, flow, factor), abs=SCORE_ATOL)


def _score_inputs(rng: np.random.Generator, shape: tuple[int, ...], factor: int,
                  special: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    moving = rng.uniform(0, 1, shape).astype(np.float32)
    coarse = tuple(n // factor for n in shape)
    flow = _flow(rng, coarse, scale=2.0, special=special)
    fixed = (cpu_warp(moving, cpu_upsample(np.nan_to_num(flow, posinf=0, neginf=0), factor))
             + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    return moving, fixed, flow


@pytest.mark.parametrize("factor", range(1, 9))
def test_score(host: HostDevice, rng: np.random.Generator, factor: int) -> None:
    shape = tuple(factor * n for n in (2, 3, 2))
    _check_score(host, *_score_inputs(rng, shape, factor), factor)


def test_score_with_more_blocks_than_threads(host: HostDevice, rng: np.random.Generator) -> None:
    # 69120 voxels: 270 rows, so iirp_score_sum's threads 0..13 add two rows each before the tree
    shape, factor = (48, 40, 36), 4
    _check_score(host, *_score_inputs(rng, shape, factor, special=False), factor)


def test_score_special_cases(host: HostDevice, rng: np.random.Generator) -> None:
    shape = (8, 12, 6)
    moving = rng.uniform(0, 1, shape).astype(np.float32)
    zero = np.zeros((3, 4, 6, 3), np.float32)
    n = moving.size
    assert _host_score(host, moving, moving, zero, 2)[0] == pytest.approx((n - 1) / n, abs=1e-12)
    assert _host_score(host, moving, np.full(shape, 0.5, np.float32), zero, 2)[0] == 0.0
    away = np.full((3, 4, 6, 3), 1e3, np.float32)
    away[0, 0, 0, 0] = np.nan
    assert _host_score(host, moving, moving, away, 2)[0] == 0.0


@given(coarse=st.tuples(*[st.integers(1, 4)] * 3), factor=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
@_HYPOTHESIS
def test_score_random_shapes(host: HostDevice, coarse: tuple[int, int, int], factor: int, seed: int) -> None:
    shape = tuple(factor * n for n in coarse)
    if int(np.prod(shape)) < 2:
        return  # the score needs two voxels (a ValueError, tested with the numba score)
    rng = np.random.default_rng(seed)
    _check_score(host, *_score_inputs(rng, shape, factor), factor)


def test_score_sum_adds_rows_in_its_fixed_order(libraries: dict[str, HostLibrary],
                                                rng: np.random.Generator) -> None:
    kernel = libraries["score.cu"].kernels["iirp_score_sum"]
    for nrows in (1, 255, 256, 257, 1000):
        rows = guarded_copy(rng.standard_normal((nrows, 5)) * 10.0 ** rng.integers(-8, 8, (nrows, 1)))
        sums = guarded_empty((5,), np.float64)
        kernel(1, 256, rows.ctypes.data, np.int32(nrows), sums.ctypes.data)
        serial = np.zeros((5, 256))
        for r in range(nrows):
            serial[:, r % 256] = serial[:, r % 256] + rows[r]
        assert_bits_equal(sums, _tree(serial[:, None, :])[:, 0])



def test_score_buffers_are_allocated_once(host: HostDevice, rng: np.random.Generator,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """IterStop scores in a loop: the device scratch is allocated on the first call and reused (grown only)."""
    monkeypatch.setattr(cuda_ops, "_WORKSPACES", {})  # a fresh device
    before = len(host.scratch)
    small = _score_inputs(rng, (16, 16, 8), 2, special=False)
    large = _score_inputs(rng, (32, 16, 16), 2, special=False)
    for _ in range(3):
        cuda_ops.fused_ncc_score(*(_in(a) for a in small), 2)
    assert len(host.scratch) - before == 1
    cuda_ops.fused_ncc_score(*(_in(a) for a in large), 2)
    cuda_ops.fused_ncc_score(*(_in(a) for a in small), 2)
    assert len(host.scratch) - before == 2  # grown once for the larger grid, then reused for the small one
