"""Trilinear warping and flow composition on the CPU (numba).

``warp(src, u)(p) = src(p + u(p))`` and ``compose(phi, du) = warp(phi, du) + du``
(SPEC section 3), the numpy/numba counterparts of :func:`iirp.model.spatial.warp`
and :func:`iirp.model.spatial.compose`.

Conventions (see :mod:`iirp.runtime.geometry`): volumes ``(X, Y, Z)`` or
``(C, X, Y, Z)``; flows ``(3, X, Y, Z)`` float32 displacements in voxels of
their own grid, component c along array axis c. Sampling is trilinear with
``align_corners=True`` semantics (voxel centres at integer indices) and zero
padding: each of the 8 corners that falls outside the volume contributes 0,
exactly as ``torch.nn.functional.grid_sample(..., mode="bilinear",
padding_mode="zeros", align_corners=True)``. The per-voxel float32 arithmetic
(``fastmath`` off) is stated in :mod:`iirp.kernels._sampling`; the results are
bit for bit those of the e109593 kernels and of the CUDA ``warp.cu``.

Two paths, same arithmetic per channel: volumes and flows (fewer than 8
channels) go through :func:`iirp.kernels._sampling.sample_tile`, which gathers
and blends one channel at a time along a row; feature maps of 8 or more
channels are first copied channels-last, so that the 8 corners of a voxel are 8
contiguous vectors of C channels and one vectorized loop blends all channels
(:func:`_warp_cl_tile`). Every output voxel is computed independently:
deterministic, independent of the thread count.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from numba import njit

from iirp.kernels._checks import as_float32, check_ndim, check_out, check_shape
from iirp.kernels._parallel import parallel_for, work_buffer
from iirp.kernels._sampling import _NF, _NI, CHUNK, COMPOSE, WARP, _corners, sample_tile

__all__ = ["warp", "warp_rows", "compose"]

#: Channels blended together by the channels-last warp: LLVM only enters its vector loop for
#: 16 or more iterations, so fewer channels are padded with spare lanes (computed, then dropped).
LANES = 16
#: Feature maps with at least this many channels are warped through a channels-last copy.
_CL_MIN_CHANNELS = 8
#: Largest number of voxels the 32-bit voxel offsets of the kernels can address.
_MAX_VOXELS = 2**31 - 1

_ZERO = np.float32(0.0)


@njit(nogil=True, cache=True, fastmath=False)
def _to_channels_last(src, cl, x_start, x_stop):  # pragma: no cover - compiled
    """Copy slabs ``x_start <= x < x_stop`` of ``src`` ``(C, X, Y, Z)`` into ``cl[((x * Y + y) * Z + z) * C + c]``."""
    nc, nx, ny, nz = src.shape
    dst = cl[:nc * nx * ny * nz].reshape((nx, ny, nz, nc))
    for x in range(x_start, x_stop):
        for y in range(ny):
            d = dst[x, y]
            for c in range(nc):
                s = src[c, x, y]
                for z in range(nz):
                    d[z, c] = s[z]


@njit(nogil=True, cache=True, fastmath=False)
def _warp_cl_tile(cl, flow, out, x_start, x_stop):  # pragma: no cover - compiled
    """Warp slabs ``x_start <= x < x_stop`` of ``out`` ``(C, X, Y, Z)`` from the channels-last copy ``cl``.

    ``cl`` holds ``src[c, i, j, k]`` at ``((i * Y + j) * Z + k) * C + c`` plus :data:`LANES`
    spare values. Per voxel the 8 corner vectors of C channels are blended in one
    loop over ``max(C, LANES)`` lanes (vectorized; lanes past C read the next
    voxel's channels and are dropped), into a chunk buffer (zeros for a point
    without a corner inside) that is then written out channel by channel. Same
    per-channel arithmetic as :func:`iirp.kernels._sampling.sample_tile`.
    """
    nc, nx, ny, nz = out.shape
    fb = np.empty((_NF, CHUNK), np.float32)
    ib = np.empty((_NI, CHUNK), np.uint32)
    tmp = np.empty(CHUNK * nc + LANES, np.float32)
    unc = np.uint64(nc)
    lanes = np.uint64(max(nc, LANES))
    for y in range(ny):
        fy = np.float32(y)
        for x in range(x_start, x_stop):
            fx = np.float32(x)
            for z0 in range(0, nz, CHUNK):
                n = min(CHUNK, nz - z0)
                for t in range(n):
                    z = np.uint64(z0 + t)
                    fb[0, t] = fx + flow[0, x, y, z]
                    fb[1, t] = fy + flow[1, x, y, z]
                    fb[2, t] = np.float32(z0 + t) + flow[2, x, y, z]
                _corners(fb, ib, n, nx, ny, nz)
                for t in range(n):
                    base = np.uint64(t) * unc
                    if fb[9, t] == _ZERO:  # no corner inside: zeros
                        for c in range(lanes):
                            tmp[base + c] = _ZERO
                        continue
                    wx0 = fb[3, t]
                    wx1 = fb[4, t]
                    wy0 = fb[5, t]
                    wy1 = fb[6, t]
                    wz0 = fb[7, t]
                    wz1 = fb[8, t]
                    dk = np.uint64(ib[4, t]) * unc
                    a0 = np.uint64(ib[0, t]) * unc
                    b0 = np.uint64(ib[1, t]) * unc
                    c0 = np.uint64(ib[2, t]) * unc
                    d0 = np.uint64(ib[3, t]) * unc
                    a1 = a0 + dk
                    b1 = b0 + dk
                    c1 = c0 + dk
                    d1 = d0 + dk
                    for c in range(lanes):
                        v00 = wz0 * cl[a0 + c] + wz1 * cl[a1 + c]
                        v01 = wz0 * cl[b0 + c] + wz1 * cl[b1 + c]
                        v10 = wz0 * cl[c0 + c] + wz1 * cl[c1 + c]
                        v11 = wz0 * cl[d0 + c] + wz1 * cl[d1 + c]
                        tmp[base + c] = wx0 * (wy0 * v00 + wy1 * v01) + wx1 * (wy0 * v10 + wy1 * v11)
                for c in range(nc):
                    for t in range(n):
                        out[c, x, y, np.uint64(z0 + t)] = tmp[t * nc + c]


def _identity_tables(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Resize tables of an axis onto itself (``upsample._axis_table(n, n)``): its blend is the identity."""
    p = np.arange(n, dtype=np.int64)
    return p, p, np.ones(n, np.float32), np.zeros(n, np.float32)


def _check_size(func: str, spatial: tuple[int, ...]) -> None:
    """Reject volumes the 32-bit voxel offsets cannot address (over 2**31 - 1 voxels, 8 GiB per channel)."""
    n = int(np.prod(spatial))
    if n > _MAX_VOXELS:
        raise ValueError(f"{func}() volumes of more than {_MAX_VOXELS} voxels are not supported, got {n}")


def _sample(src: np.ndarray, flow: np.ndarray, out: np.ndarray, mode: int, x_start: int = 0) -> None:
    """:func:`sample_tile` over the x slabs ``x_start <= x < x_start + out.shape[1]``: ``out = warp(src, flow)`` (``+
    flow`` for :data:`COMPOSE`) on those slabs, slab x in ``out[:, x - x_start]``."""
    tables = _identity_tables(flow.shape[1]) + _identity_tables(flow.shape[2])
    dummy = np.zeros((1, 1, 1), np.float32)
    partials = np.zeros((1, 5), np.float64)
    factor = np.float32(1.0)
    parallel_for(lambda a, b: sample_tile(src, flow, *tables, factor, mode, out, dummy, partials,
                                          x_start + a, x_start + b, x_start),
                 out.shape[1], out.size)


def _warp_channels_last(src: np.ndarray, flow: np.ndarray, out: np.ndarray) -> None:
    """``out = warp(src, flow)`` for ``src`` ``(C, X, Y, Z)`` through a channels-last work buffer."""
    cl = work_buffer("channels_last", src.size + LANES)
    cl[src.size:] = 0  # read by the spare lanes of the last voxel
    nx = src.shape[1]
    parallel_for(lambda a, b: _to_channels_last(src, cl, a, b), nx, src.size)
    parallel_for(lambda a, b: _warp_cl_tile(cl, flow, out, a, b), nx, src.size)


def warp(src: np.ndarray, flow: np.ndarray, *, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``warp(src, u)(p) = src(p + u(p))``: trilinear, align_corners=True, zeros outside.

    Matches ``grid_sample(src[None], grid, padding_mode="zeros", align_corners=True)``
    (see :func:`iirp.model.spatial.warp`) to float32 rounding; the per-voxel float32
    arithmetic is the contract of :mod:`iirp.kernels._sampling` (bit for bit the
    CUDA ``warp.cu``). Runs on the CPU with numba, on ``numba.get_num_threads()``
    threads over ranges of the first spatial axis. A feature map of 8 or more
    channels is sampled through a channels-last copy kept in a work buffer of this
    thread between calls (the size of ``src``).

    Args:
        src: ``(X, Y, Z)`` or ``(C, X, Y, Z)`` volume to sample (CPU, any units).
        flow: ``(3, X, Y, Z)`` displacement in voxels of src's grid, component c
            along array axis c (see :mod:`iirp.runtime.geometry`).
        out: optional C-contiguous float32 buffer with src's shape, written in
            place and returned; must not overlap ``src`` or ``flow``.

    Non-float32 or non-contiguous inputs are converted with
    ``np.ascontiguousarray(x, dtype=np.float32)`` first (a copy, which may round).

    Returns:
        float32 array with src's shape (``out`` when given): the warped volume.

    Raises:
        TypeError: src or flow is not a real-valued array.
        ValueError: src is not 3-D or 4-D, flow's shape is not ``(3, X, Y, Z)``,
            or ``out`` is not a C-contiguous float32 array of src's shape or overlaps an input.
    """
    src = as_float32("warp", "src", src)
    flow = as_float32("warp", "flow", flow)
    check_ndim("warp", "src", src, "(X, Y, Z) or (C, X, Y, Z)", (3, 4))
    spatial = src.shape[-3:]
    check_shape("warp", "flow", flow, (3, *spatial))
    result = check_out("warp", out, src.shape, {"src": src, "flow": flow})
    _check_size("warp", spatial)
    src4 = src.reshape((-1, *spatial))
    out4 = result.reshape(src4.shape)
    if src4.shape[0] >= _CL_MIN_CHANNELS:
        _warp_channels_last(src4, flow, out4)
    else:
        _sample(src4, flow, out4, WARP)
    return result


def warp_rows(src: np.ndarray, flow: np.ndarray, x_start: int, x_stop: int, *,
              out: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows ``x_start <= x < x_stop`` of :func:`warp` ``(src, flow)``, bit for bit, without the rest.

    For a consumer that takes the warped volume a slab at a time (the finest flow estimator run in
    slabs, :class:`iirp.runtime.slabs.WarpedInput`): no whole warped volume is ever held. Runs
    :func:`iirp.kernels._sampling.sample_tile` one channel at a time (no channels-last copy of ``src``,
    which would be as large as the whole result).

    Args:
        src: ``(C, X, Y, Z)`` volume(s) to sample (``(X, Y, Z)`` is one channel).
        flow: ``(3, X, Y, Z)`` displacement in voxels of src's grid.
        x_start, x_stop: the rows, ``0 <= x_start < x_stop <= X``.
        out: optional C-contiguous float32 ``(C, x_stop - x_start, Y, Z)`` buffer (``(x_stop - x_start, Y, Z)``
            for a 3-D src), not overlapping the inputs.

    Returns:
        float32 ``(C, x_stop - x_start, Y, Z)`` (``out`` when given): ``warp(src, flow)[..., x_start:x_stop, :, :]``.

    Raises:
        TypeError, ValueError: as :func:`warp`, and for rows outside ``[0, X)`` or an empty range.
    """
    src = as_float32("warp_rows", "src", src)
    flow = as_float32("warp_rows", "flow", flow)
    check_ndim("warp_rows", "src", src, "(X, Y, Z) or (C, X, Y, Z)", (3, 4))
    spatial = src.shape[-3:]
    check_shape("warp_rows", "flow", flow, (3, *spatial))
    if not 0 <= x_start < x_stop <= spatial[0]:
        raise ValueError(f"warp_rows() needs 0 <= x_start < x_stop <= {spatial[0]}, got {x_start}, {x_stop}")
    shape = (*src.shape[:-3], x_stop - x_start, *spatial[1:])
    result = check_out("warp_rows", out, shape, {"src": src, "flow": flow})
    _check_size("warp_rows", spatial)
    _sample(src.reshape((-1, *spatial)), flow, result.reshape((-1, *shape[-3:])), WARP, x_start)
    return result


def compose(phi: np.ndarray, du: np.ndarray, *, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``compose(phi, du) = warp(phi, du) + du`` in one pass: apply du first, then phi.

    Bit for bit ``warp(phi, du) + du`` (same float32 arithmetic; a voxel whose
    sample point has no corner inside gets ``du`` itself). Runs on the CPU with
    numba, on ``numba.get_num_threads()`` threads over ranges of the first spatial axis.

    Args:
        phi: ``(3, X, Y, Z)`` displacement in voxels, component c along axis c.
        du: ``(3, X, Y, Z)`` displacement in voxels, applied first.
        out: optional C-contiguous float32 ``(3, X, Y, Z)`` buffer, written in
            place and returned; must not overlap ``phi`` or ``du``.

    Non-float32 or non-contiguous inputs are converted with
    ``np.ascontiguousarray(x, dtype=np.float32)`` first.

    Returns:
        ``(3, X, Y, Z)`` float32 composed displacement in voxels (``out`` when given).

    Raises:
        TypeError: phi or du is not a real-valued array.
        ValueError: phi is not ``(3, X, Y, Z)``, du's shape differs from phi's,
            or ``out`` is unusable (wrong shape, dtype, layout, or overlapping an input).
    """
    phi = as_float32("compose", "phi", phi)
    du = as_float32("compose", "du", du)
    check_ndim("compose", "phi", phi, "(3, X, Y, Z)", (4,))
    if phi.shape[0] != 3:
        check_shape("compose", "phi", phi, (3, *phi.shape[1:]))
    check_shape("compose", "du", du, phi.shape)
    result = check_out("compose", out, phi.shape, {"phi": phi, "du": du})
    _check_size("compose", phi.shape[1:])
    _sample(phi, du, result, COMPOSE)
    return result
