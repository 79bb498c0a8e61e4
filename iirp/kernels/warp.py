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
padding_mode="zeros", align_corners=True)``.

Per-voxel arithmetic (float32, ``fastmath`` off: no FMA contraction, no
reassociation), the contract the CUDA port in ``cuda/sampling.cuh`` follows:

* sample point ``p = (x + u0, y + u1, z + u2)``; it has a corner in the
  volume iff ``-1 < p_a < n_a`` on every axis a (false for NaN and inf);
  otherwise the result is 0 (warp) or ``du`` (compose);
* per axis ``f = floor(t)``, ``w1 = t - f``, ``w0 = 1 - w1``, ``i0 = f``,
  ``i1 = i0 + 1``; a corner index outside ``[0, n)`` is clamped into it and its
  weight set to 0;
* ``v_ij = wz0 * s[i, j, k0] + wz1 * s[i, j, k1]``, then
  ``wx0 * (wy0 * v_00 + wy1 * v_01) + wx1 * (wy0 * v_10 + wy1 * v_11)``
  (z innermost, then y, then x); compose adds ``du`` last.

How it is computed (the speed, not the contract): the kernels walk a row of
voxels (fixed x, y) in chunks of :data:`CHUNK` along z. One loop finds the
corners and weights of the whole chunk without branches (LLVM vectorizes it),
one gathers the 8 corner values of every voxel (scalar loads, independent of
each other), and one blends them and writes the output row (vectorized). Rows
are visited tile by tile (a few x slabs, then y, then the slabs of the tile)
so that the source rows a tile needs stay in cache. Every output voxel is
computed independently, so results are deterministic and independent of the
thread count. :func:`_corners` and :func:`_gather` are shared with
:mod:`iirp.kernels.score`, so the fused score samples the moving image bit for
bit as :func:`warp` does.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

import numba
import numpy as np
from numba import njit, prange

from iirp.kernels._checks import as_float32, check_ndim, check_out, check_shape

__all__ = ["warp", "compose"]

#: Voxels of a row handled per inner step: the chunk's buffers (a few KiB) stay in L1.
CHUNK = 64
#: Rows of the float32 chunk buffer of :func:`_corners`: px, py, pz (input), 6 weights, inside flag.
_NF = 10
#: Rows of the offset buffer of :func:`_corners`: 4 corner-row offsets and the z step.
_NI = 5
#: Largest number of voxels the int32/uint32 voxel offsets can address.
_MAX_VOXELS = 2**31 - 1
#: Preferred x slabs per tile (rows of a tile share their source rows in cache).
_TILE = 16
#: Channels blended together by the channels-last warp: LLVM only enters its vector loop for
#: 16 or more iterations, so fewer channels are padded with spare lanes (computed, then dropped).
LANES = 16
#: Feature maps with at least this many channels are warped through a channels-last copy.
_CL_MIN_CHANNELS = 8
#: Calls that produce fewer values run on the calling thread only: waking numba's worker
#: threads costs more than such a call (milliseconds on a busy machine with the omp layer).
_SERIAL_WORK = 2**19

_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_MINUS_ONE = np.float32(-1.0)


@njit(inline="always")
def _corners(fb, ib, n, nx, ny, nz):  # pragma: no cover - compiled
    """Corners and weights of ``n`` float32 sample points along a row chunk, branch free.

    Reads ``fb[0, t], fb[1, t], fb[2, t]`` (the point ``(px, py, pz)``, t < n) and writes
    ``fb[3..8, t] = wx0, wx1, wy0, wy1, wz0, wz1``, ``fb[9, t]`` = 1 if the point
    has a corner in the volume else 0, and ``ib[r, t]`` = flat offset
    ``(i * ny + j) * nz + k0`` of the corner rows r = (i0, j0), (i0, j1), (i1, j0),
    (i1, j1), ``ib[4, t] = k1 - k0`` (0 or 1). Weights and clamped indices follow
    the module contract exactly (``_axis`` of e109593); a point without a corner
    inside is replaced by (0, 0, 0) so its offsets stay valid (its result is
    masked by the caller). Inlined, so the constant row stride of the caller's
    buffers lets LLVM vectorize the loop without alias checks.
    """
    fnx = np.float32(nx)
    fny = np.float32(ny)
    fnz = np.float32(nz)
    # corner indices are handled as exact float32 integers (axes are shorter than 2**24) and
    # offsets as 32-bit integers: numba would widen int32 arithmetic to int64, which AVX2 lacks
    lx = np.float32(nx - 1)
    ly = np.float32(ny - 1)
    lz = np.float32(nz - 1)
    sx = np.int32(ny * nz)
    sy = np.int32(nz)
    for t in range(n):
        px = fb[0, t]
        py = fb[1, t]
        pz = fb[2, t]
        inside = (px > _MINUS_ONE) & (px < fnx) & (py > _MINUS_ONE) & (py < fny) & (pz > _MINUS_ONE) & (pz < fnz)
        px = px if inside else _ZERO
        py = py if inside else _ZERO
        pz = pz if inside else _ZERO
        # per axis: f = floor(t), w1 = t - f, w0 = 1 - w1, i0 = f, i1 = f + 1; an index
        # outside [0, n) is clamped and its weight zeroed (i0 == -1 or i1 == n)
        f = np.floor(px)
        wx1 = px - f
        wx0 = _ONE - wx1
        g = f + _ONE
        wx0 = _ZERO if f < _ZERO else wx0
        wx1 = _ZERO if g > lx else wx1
        i0 = np.int32(_ZERO if f < _ZERO else f)
        i1 = np.int32(lx if g > lx else g)
        f = np.floor(py)
        wy1 = py - f
        wy0 = _ONE - wy1
        g = f + _ONE
        wy0 = _ZERO if f < _ZERO else wy0
        wy1 = _ZERO if g > ly else wy1
        j0 = np.int32(_ZERO if f < _ZERO else f)
        j1 = np.int32(ly if g > ly else g)
        f = np.floor(pz)
        wz1 = pz - f
        wz0 = _ONE - wz1
        g = f + _ONE
        wz0 = _ZERO if f < _ZERO else wz0
        wz1 = _ZERO if g > lz else wz1
        k0 = np.int32(_ZERO if f < _ZERO else f)
        k1 = np.int32(lz if g > lz else g)
        fb[3, t] = wx0
        fb[4, t] = wx1
        fb[5, t] = wy0
        fb[6, t] = wy1
        fb[7, t] = wz0
        fb[8, t] = wz1
        fb[9, t] = _ONE if inside else _ZERO
        r0 = np.uint32(i0 * sx + k0)
        r1 = np.uint32(i1 * sx + k0)
        q0 = np.uint32(j0 * sy)
        q1 = np.uint32(j1 * sy)
        ib[0, t] = r0 + q0
        ib[1, t] = r0 + q1
        ib[2, t] = r1 + q0
        ib[3, t] = r1 + q1
        ib[4, t] = np.uint32(k1 - k0)


@njit(inline="always")
def _gather(flat, base, ib, g, n):  # pragma: no cover - compiled
    """``g[2r, t], g[2r+1, t]`` = ``flat[base + ib[r, t]]`` and the next corner along z, r = 0..3, t < n."""
    for t in range(n):
        dk = np.uint64(ib[4, t])
        o = base + np.uint64(ib[0, t])
        g[0, t] = flat[o]
        g[1, t] = flat[o + dk]
        o = base + np.uint64(ib[1, t])
        g[2, t] = flat[o]
        g[3, t] = flat[o + dk]
        o = base + np.uint64(ib[2, t])
        g[4, t] = flat[o]
        g[5, t] = flat[o + dk]
        o = base + np.uint64(ib[3, t])
        g[6, t] = flat[o]
        g[7, t] = flat[o + dk]


@njit(fastmath=False)
def _warp_tile(src, flow, out, add_flow, x_start, x_stop):  # pragma: no cover - compiled
    """Warp (``add_flow`` False) or compose slabs ``x_start <= x < x_stop`` of ``out`` (see :func:`_warp_kernel`)."""
    nc, nx, ny, nz = src.shape
    nvox = nx * ny * nz
    flat = src.reshape(nc * nvox)
    fb = np.empty((_NF, CHUNK), np.float32)
    ib = np.empty((_NI, CHUNK), np.uint32)
    g = np.empty((8, CHUNK), np.float32)
    for y in range(ny):
        fy = np.float32(y)
        for x in range(x_start, x_stop):
            fx = np.float32(x)
            for z0 in range(0, nz, CHUNK):
                n = min(CHUNK, nz - z0)
                u0 = flow[0, x, y, z0:z0 + n]
                u1 = flow[1, x, y, z0:z0 + n]
                u2 = flow[2, x, y, z0:z0 + n]
                for t in range(n):
                    fb[0, t] = fx + u0[t]
                    fb[1, t] = fy + u1[t]
                    fb[2, t] = np.float32(z0 + t) + u2[t]
                _corners(fb, ib, n, nx, ny, nz)
                for c in range(nc):
                    _gather(flat, np.uint64(c * nvox), ib, g, n)
                    row = out[c, x, y, z0:z0 + n]
                    if add_flow:
                        du = flow[c, x, y, z0:z0 + n]
                    else:
                        du = u0  # unused
                    for t in range(n):
                        wy0 = fb[5, t]
                        wy1 = fb[6, t]
                        wz0 = fb[7, t]
                        wz1 = fb[8, t]
                        v00 = wz0 * g[0, t] + wz1 * g[1, t]
                        v01 = wz0 * g[2, t] + wz1 * g[3, t]
                        v10 = wz0 * g[4, t] + wz1 * g[5, t]
                        v11 = wz0 * g[6, t] + wz1 * g[7, t]
                        v = fb[3, t] * (wy0 * v00 + wy1 * v01) + fb[4, t] * (wy0 * v10 + wy1 * v11)
                        if add_flow:
                            row[t] = v + du[t] if fb[9, t] != _ZERO else du[t]
                        else:
                            row[t] = v if fb[9, t] != _ZERO else _ZERO


@njit(parallel=True, cache=True, fastmath=False)
def _warp_kernel(src, flow, out, add_flow, tile):  # pragma: no cover - compiled
    """``out[c, p] = src[c](p + flow[:, p])`` (+ ``flow[c, p]`` when ``add_flow``); prange over tiles of x slabs.

    ``src`` and ``out`` are ``(C, X, Y, Z)``, ``flow`` is ``(3, X, Y, Z)`` (for compose
    ``src`` is the flow ``phi`` and ``C == 3``); ``tile`` is the number of x slabs per
    work item (any value gives the same result).
    """
    nx = src.shape[1]
    n_tiles = (nx + tile - 1) // tile
    for k in prange(n_tiles):
        _warp_tile(src, flow, out, add_flow, k * tile, min(nx, (k + 1) * tile))


@njit(fastmath=False)
def _warp_cl_tile(cl, flow, out, x_start, x_stop):  # pragma: no cover - compiled
    """Warp slabs ``x_start <= x < x_stop`` of ``out`` ``(C, X, Y, Z)`` from the channels-last copy ``cl``.

    ``cl`` holds ``src[c, i, j, k]`` at ``((i * Y + j) * Z + k) * C + c`` plus :data:`LANES`
    spare values. Per voxel the 8 corner vectors of C channels are blended in one
    loop over ``max(C, LANES)`` lanes (vectorized; lanes past C read the next
    voxel's channels and are dropped), into a chunk buffer (zeros for a point
    without a corner inside) that is then written out channel by channel. Same
    per-channel arithmetic as :func:`_warp_tile`.
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
                u0 = flow[0, x, y, z0:z0 + n]
                u1 = flow[1, x, y, z0:z0 + n]
                u2 = flow[2, x, y, z0:z0 + n]
                for t in range(n):
                    fb[0, t] = fx + u0[t]
                    fb[1, t] = fy + u1[t]
                    fb[2, t] = np.float32(z0 + t) + u2[t]
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
                    row = out[c, x, y, z0:z0 + n]
                    for t in range(n):
                        row[t] = tmp[t * nc + c]


@njit(parallel=True, cache=True, fastmath=False)
def _warp_cl_kernel(src, flow, out, cl, tile):  # pragma: no cover - compiled
    """``out[c, p] = src[c](p + flow[:, p])`` through the channels-last work buffer ``cl``.

    ``src`` and ``out`` are ``(C, X, Y, Z)``; ``cl`` is a float32 buffer of
    ``C * X * Y * Z + LANES`` values, overwritten. First copies ``src`` into ``cl``
    (prange over x), then samples it (:func:`_warp_cl_tile`, prange over tiles of
    ``tile`` x slabs).
    """
    nc, nx, ny, nz = src.shape
    n = nc * nx * ny * nz
    dst = cl[:n].reshape((nx, ny, nz, nc))
    for x in prange(nx):
        for y in range(ny):
            d = dst[x, y]
            for c in range(nc):
                s = src[c, x, y]
                for z in range(nz):
                    d[z, c] = s[z]
    for i in range(n, cl.shape[0]):
        cl[i] = _ZERO  # read by the spare lanes of the last voxel
    n_tiles = (nx + tile - 1) // tile
    for k in prange(n_tiles):
        _warp_cl_tile(cl, flow, out, k * tile, min(nx, (k + 1) * tile))


_scratch = threading.local()


def _work_buffer(name: str, size: int) -> np.ndarray:
    """A float32 work array of ``size`` elements, reused by later calls from this thread.

    Large numba-side allocations fault their pages in one by one; a buffer kept
    between calls (IterStop warps the same shapes again and again) costs nothing
    after the first call. It holds at most the largest size asked for, per name.
    """
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(name)
    if buf is None or buf.size < size:
        buf = buffers[name] = np.empty(size, dtype=np.float32)
    return buf[:size]


def _tile_width(nx: int) -> int:
    """x slabs per work item: about :data:`_TILE`, in a multiple of the thread count of tiles (balanced)."""
    threads = numba.get_num_threads()
    tiles = threads * -(-nx // (_TILE * threads))
    return max(1, -(-nx // tiles))


def _launch(kernel: Callable[..., Any], work: int, *args: Any) -> Any:
    """``kernel(*args)``, on the calling thread alone when ``work`` (values written) is below :data:`_SERIAL_WORK`.

    The result does not depend on the thread count; only the wall time does.
    """
    threads = numba.get_num_threads()
    if work >= _SERIAL_WORK or threads == 1:
        return kernel(*args)
    numba.set_num_threads(1)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(threads)


def _check_size(func: str, spatial: tuple[int, ...]) -> None:
    n = int(np.prod(spatial))
    if n > _MAX_VOXELS:
        raise ValueError(f"{func}() volumes of more than {_MAX_VOXELS} voxels are not supported, got {n}")


def warp(src: np.ndarray, flow: np.ndarray, *, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``warp(src, u)(p) = src(p + u(p))``: trilinear, align_corners=True, zeros outside.

    Matches ``grid_sample(src[None], grid, padding_mode="zeros", align_corners=True)``
    (see :func:`iirp.model.spatial.warp`) to float32 rounding; the per-voxel float32
    arithmetic is the module's contract (bit for bit the CUDA ``warp.cu``). Runs on
    the CPU with numba, parallel over tiles of the first spatial axis.

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
        cl = _work_buffer("channels_last", src4.size + LANES)
        _launch(_warp_cl_kernel, src4.size, src4, flow, out4, cl, _tile_width(spatial[0]))
    else:
        _launch(_warp_kernel, src4.size, src4, flow, out4, False, _tile_width(spatial[0]))
    return result


def compose(phi: np.ndarray, du: np.ndarray, *, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``compose(phi, du) = warp(phi, du) + du`` in one pass: apply du first, then phi.

    Bit for bit ``warp(phi, du) + du`` (same float32 arithmetic; a voxel whose
    sample point has no corner inside gets ``du`` itself). Runs on the CPU with
    numba, parallel over tiles of the first spatial axis.

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
    _launch(_warp_kernel, phi.size, phi, du, result, True, _tile_width(phi.shape[1]))
    return result
