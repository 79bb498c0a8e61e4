"""Row-chunked trilinear sampling shared by warp, compose and the fused score (internal).

The per-voxel contract (float32, ``fastmath`` off: no FMA contraction, no
reassociation; the CUDA port in ``cuda/sampling.cuh`` follows it bit for bit):

* sample point ``p = (x, y, z) + s * u``; for warp and compose ``s = 1`` and
  ``u`` is the flow, for the score ``u`` is the coarse flow resized with
  ``align_corners=True``, ``wx0 * (wy0 * p00 + wy1 * p01) + wx1 * (wy0 * p10 + wy1 * p11)``
  of the z-resized planes (exactly what :func:`iirp.kernels.upsample` writes
  before its scaling); for warp and compose the resize tables are the identity,
  whose blend returns every finite value unchanged (and a non-finite one leaves
  the volume either way);
* ``p`` has a corner in the volume iff ``-1 < p_a < n_a`` on every axis a
  (false for NaN and inf); otherwise warp gives 0, compose gives ``du`` and the
  score skips the terms with ``a``;
* per axis ``f = floor(t)``, ``w1 = t - f``, ``w0 = 1 - w1``, ``i0 = f``,
  ``i1 = i0 + 1``; a corner index outside ``[0, n)`` is clamped into it and its
  weight set to 0;
* ``v_ij = wz0 * s[i, j, k0] + wz1 * s[i, j, k1]``, then
  ``wx0 * (wy0 * v_00 + wy1 * v_01) + wx1 * (wy0 * v_10 + wy1 * v_11)``
  (z innermost, then y, then x); compose adds ``du`` last.

How it is computed (the speed, not the contract): a row of voxels (fixed x, y)
is walked in chunks of :data:`CHUNK` along z. One loop forms the sample points
(a vectorized blend), one finds corners and weights without branches
(:func:`_corners`, vectorized by LLVM), one gathers the 8 corner values of
every voxel (:func:`_gather`, scalar loads independent of each other) and one
blends them (vectorized). Rows are visited y by y across the x slabs of a work
item, so the source rows those slabs share stay in cache. Every output voxel
is computed once, by one work item, so results are deterministic and
independent of the thread count (see :mod:`iirp.kernels._parallel`).

Layouts: C-contiguous float32 volumes ``(X, Y, Z)``, feature maps
``(C, X, Y, Z)``, flows ``(3, X, Y, Z)`` in voxels of their grid, component c
along array axis c (see :mod:`iirp.runtime.geometry`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["CHUNK", "WARP", "COMPOSE", "SCORE", "sample_tile"]

#: Voxels of a row handled per inner step: the chunk's buffers (a few KiB) stay in L1.
CHUNK = 64
#: Rows of the float32 chunk buffer of :func:`_corners`: px, py, pz (input), 6 weights, inside flag.
_NF = 10
#: Rows of the offset buffer of :func:`_corners`: 4 corner-row offsets and the z step.
_NI = 5
#: What :func:`sample_tile` does with the samples.
WARP, COMPOSE, SCORE = 0, 1, 2

_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_MINUS_ONE = np.float32(-1.0)


@njit(inline="always")
def _axis(t, last):  # pragma: no cover - compiled
    """``(w0, w1, i0, i1)`` on one axis of ``last + 1`` voxels, branch free: ``f = floor(t)``,
    ``w1 = t - f``, ``w0 = 1 - w1``, ``i0 = f``, ``i1 = f + 1``; an index outside ``[0, last]``
    (i0 == -1 or i1 == last + 1) is clamped and its weight zeroed. ``last`` and ``t`` are float32;
    the indices come back as int32."""
    f = np.floor(t)
    w1 = t - f
    w0 = _ONE - w1
    g = f + _ONE
    w0 = _ZERO if f < _ZERO else w0
    w1 = _ZERO if g > last else w1
    return w0, w1, np.int32(_ZERO if f < _ZERO else f), np.int32(last if g > last else g)


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
        wx0, wx1, i0, i1 = _axis(px, lx)
        wy0, wy1, j0, j1 = _axis(py, ly)
        wz0, wz1, k0, k1 = _axis(pz, lz)
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


@njit(nogil=True, cache=True, fastmath=False)
def sample_tile(src, planes, xi0, xi1, xw0, xw1, yi0, yi1, yw0, yw1, factor, mode, out, fixed, partials,
                x_start, x_stop, x_out):  # pragma: no cover - compiled
    """Sample ``src`` at ``p = (x, y, z) + factor * u(p)`` for the slabs ``x_start <= x < x_stop``.

    Args:
        src: ``(C, X, Y, Z)`` float32 volume(s) to sample (``C == 1`` for the score).
        planes: ``(3, x, y, Z)`` float32 z-resized flow; ``u`` is its y-then-x blend
            with the resize tables ``xi0 .. xw1`` (length X) and ``yi0 .. yw1``
            (length Y), in voxels of the coarse grid. For warp and compose: the
            flow itself with identity tables.
        factor: float32 scale of ``u`` (the upsampling factor; 1 for warp and compose).
        mode: :data:`WARP` (``out = sample``, 0 without a corner inside),
            :data:`COMPOSE` (``out = sample + planes``, ``planes`` alone without a
            corner inside) or :data:`SCORE`.
        out: ``(C, X, Y, Z)`` float32 output for warp and compose (unused for the score); slab x is written
            at ``out[:, x - x_out]``, so with ``x_out = x_start`` an output of ``x_stop - x_start`` rows takes
            just these slabs (``x_out`` is 0 for a whole output; the score passes 0 too, so that one compiled
            overload serves every caller).
        fixed: ``(X, Y, Z)`` float32 fixed image for the score (unused otherwise).
        partials: ``(X, 5)`` float64 for the score: row x gets the sums over slab x
            of a, b, a*a, b*b, a*b (a = sample, b = fixed), a-terms only where the
            point has a corner inside. Each slab sums into ``CHUNK`` float64 lanes
            per moment (lane t takes the voxels at z = t, t + CHUNK, ... of every
            row, rows in y order), added in lane order at the end: an order fixed
            by the shape alone.
    """
    nc, nx, ny, nz = src.shape
    nvox = nx * ny * nz
    flat = src.reshape(nc * nvox)
    score = mode == SCORE
    fb = np.empty((_NF, CHUNK), np.float32)
    ib = np.empty((_NI, CHUNK), np.uint32)
    g = np.empty((8, CHUNK), np.float32)
    acc = np.zeros((x_stop - x_start if score else 0, 5, CHUNK), np.float64)
    for y in range(ny):
        j0, j1, wy0, wy1 = yi0[y], yi1[y], yw0[y], yw1[y]
        fy = np.float32(y)
        for x in range(x_start, x_stop):
            i0, i1, wx0, wx1 = xi0[x], xi1[x], xw0[x], xw1[x]
            fx = np.float32(x)
            for z0 in range(0, nz, CHUNK):
                n = min(CHUNK, nz - z0)
                # sample points: the blend of the resized flow, scaled by the factor
                # (a voxel-unit flow is measured on its grid); z indices unsigned, no wraparound
                for c in range(3):
                    for t in range(n):
                        z = np.uint64(z0 + t)
                        u = wx0 * (wy0 * planes[c, i0, j0, z] + wy1 * planes[c, i0, j1, z]) + wx1 * (
                            wy0 * planes[c, i1, j0, z] + wy1 * planes[c, i1, j1, z])
                        origin = fx if c == 0 else (fy if c == 1 else np.float32(z0 + t))
                        fb[c, t] = origin + factor * u
                _corners(fb, ib, n, nx, ny, nz)
                for c in range(nc):
                    _gather(flat, np.uint64(c * nvox), ib, g, n)
                    # the trilinear sample (float32) into g[0]
                    for t in range(n):
                        wy0_ = fb[5, t]
                        wy1_ = fb[6, t]
                        wz0 = fb[7, t]
                        wz1 = fb[8, t]
                        v00 = wz0 * g[0, t] + wz1 * g[1, t]
                        v01 = wz0 * g[2, t] + wz1 * g[3, t]
                        v10 = wz0 * g[4, t] + wz1 * g[5, t]
                        v11 = wz0 * g[6, t] + wz1 * g[7, t]
                        g[0, t] = fb[3, t] * (wy0_ * v00 + wy1_ * v01) + fb[4, t] * (wy0_ * v10 + wy1_ * v11)
                    if score:
                        # float64 moments; a point without a corner inside adds b terms only
                        s = x - x_start
                        for t in range(n):
                            inside = fb[9, t] != _ZERO
                            a = np.float64(g[0, t])
                            b = np.float64(fixed[x, y, np.uint64(z0 + t)])
                            acc[s, 0, t] += a if inside else 0.0
                            acc[s, 1, t] += b
                            acc[s, 2, t] += a * a if inside else 0.0
                            acc[s, 3, t] += b * b
                            acc[s, 4, t] += a * b if inside else 0.0
                    else:
                        compose = mode == COMPOSE
                        for t in range(n):
                            z = np.uint64(z0 + t)
                            du = planes[c, x, y, z] if compose else _ZERO  # identity tables: planes is du
                            v = g[0, t] + du if compose else g[0, t]
                            out[c, x - x_out, y, z] = v if fb[9, t] != _ZERO else du
    if score:
        for x in range(x_start, x_stop):
            for k in range(5):
                s = 0.0
                for t in range(CHUNK):
                    s += acc[x - x_start, k, t]
                partials[x, k] = s
