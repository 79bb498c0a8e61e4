"""Global NCC and the fused IterStop score on the CPU (numba).

SPEC section 3/5: ``score(phi at level i) = NCC(warp(m, up_s(phi)), f)`` with
``s = 2 ** (i - 1)`` and the global NCC
``mean((a - mean a) * (b - mean b)) / (std a * std b)`` (unbiased std, N - 1).

:func:`fused_ncc_score` computes that score in one pass over the full-resolution
grid without materialising the upsampled flow or the warped image: for every
voxel it blends the coarse flow (exactly as :func:`iirp.kernels.upsample` does),
samples the moving image (exactly as :func:`iirp.kernels.warp` does) and
accumulates five float64 sums in per-slab partials, added in a fixed order
(so the score does not depend on the thread count).

Conventions: see :mod:`iirp.runtime.geometry` (volumes ``(X, Y, Z)``, flows
``(3, x, y, z)`` in voxels of their own grid, component c along axis c;
trilinear sampling with align_corners=True and zero padding).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit, prange

from iirp.kernels._checks import as_float32, check_factor, check_ndim, check_shape
from iirp.kernels.upsample import _flow_planes
from iirp.kernels.warp import _NF, _NI, CHUNK, _check_size, _corners, _gather, _tile_width

__all__ = ["ncc", "fused_ncc_score"]

#: A one-pass variance below this fraction of the mean square is rounding noise
#: of the float64 sums (their relative error is ~1e-12 at 5M voxels): treat it as 0.
_VAR_REL_TOL = 1e-10


_CHUNK = 1 << 16  # elements per parallel work item of the moment sums


@njit(parallel=True, cache=True, fastmath=False)
def _centered_sums(a, b, ma, mb):  # pragma: no cover - compiled
    """Partial float64 sums of da, db, da*da, db*db, da*db with ``da = a - ma``, ``db = b - mb``.

    ``a`` and ``b`` are flat float32. Parallel over chunks of ``_CHUNK``
    elements, each summed serially into its own row: returns ``(n_chunks, 5)``
    partials, which the caller adds in a fixed order (so the result does not
    depend on the thread count).
    """
    n = a.shape[0]
    n_chunks = (n + _CHUNK - 1) // _CHUNK
    partials = np.zeros((n_chunks, 5), dtype=np.float64)
    for chunk in prange(n_chunks):
        sa = 0.0
        sb = 0.0
        saa = 0.0
        sbb = 0.0
        sab = 0.0
        for i in range(chunk * _CHUNK, min(n, (chunk + 1) * _CHUNK)):
            da = np.float64(a[i]) - ma
            db = np.float64(b[i]) - mb
            sa += da
            sb += db
            saa += da * da
            sbb += db * db
            sab += da * db
        partials[chunk, 0] = sa
        partials[chunk, 1] = sb
        partials[chunk, 2] = saa
        partials[chunk, 3] = sbb
        partials[chunk, 4] = sab
    return partials


@njit(fastmath=False)
def _score_tile(moving, fixed, planes, xi0, xi1, xw0, xw1, yi0, yi1, yw0, yw1, factor,
                x_start, x_stop, partials):  # pragma: no cover - compiled
    """Rows ``partials[x]`` (sums of a, b, a*a, b*b, a*b) for the slabs ``x_start <= x < x_stop``.

    Each slab sums into ``CHUNK`` float64 lanes per moment (lane t takes the
    voxels at z = t, t + CHUNK, ... of every row, rows in y order); the lanes are
    then added in lane order. The order depends only on the shape, not on the
    tiling or the thread count.
    """
    nx, ny, nz = moving.shape
    flat = moving.reshape(nx * ny * nz)
    fb = np.empty((_NF, CHUNK), np.float32)
    ib = np.empty((_NI, CHUNK), np.uint32)
    g = np.empty((8, CHUNK), np.float32)
    acc = np.zeros((x_stop - x_start, 5, CHUNK), np.float64)
    identity = planes.shape[1] == nx and planes.shape[2] == ny  # factor 1: planes is the flow itself
    for y in range(ny):
        j0, j1, wy0, wy1 = yi0[y], yi1[y], yw0[y], yw1[y]
        fy = np.float32(y)
        for x in range(x_start, x_stop):
            i0, i1, wx0, wx1 = xi0[x], xi1[x], xw0[x], xw1[x]
            fx = np.float32(x)
            lanes = acc[x - x_start]
            for z0 in range(0, nz, CHUNK):
                n = min(CHUNK, nz - z0)
                z1 = z0 + n
                # sample points p = (x, y, z) + factor * u with u the upsampled flow, blended
                # exactly as upsample() blends it (the voxel-unit flow is scaled with its grid).
                # For factor 1 the tables are the identity and the blend returns the flow value
                # itself for every finite value (a non-finite one leaves the volume either way)
                if identity:
                    u0 = planes[0, x, y, z0:z1]
                    u1 = planes[1, x, y, z0:z1]
                    u2 = planes[2, x, y, z0:z1]
                    for t in range(n):
                        fb[0, t] = fx + factor * u0[t]
                        fb[1, t] = fy + factor * u1[t]
                        fb[2, t] = np.float32(z0 + t) + factor * u2[t]
                else:
                    for c in range(2):
                        p00 = planes[c, i0, j0, z0:z1]
                        p01 = planes[c, i0, j1, z0:z1]
                        p10 = planes[c, i1, j0, z0:z1]
                        p11 = planes[c, i1, j1, z0:z1]
                        origin = fx if c == 0 else fy
                        for t in range(n):
                            u = wx0 * (wy0 * p00[t] + wy1 * p01[t]) + wx1 * (wy0 * p10[t] + wy1 * p11[t])
                            fb[c, t] = origin + factor * u
                    p00 = planes[2, i0, j0, z0:z1]
                    p01 = planes[2, i0, j1, z0:z1]
                    p10 = planes[2, i1, j0, z0:z1]
                    p11 = planes[2, i1, j1, z0:z1]
                    for t in range(n):
                        u = wx0 * (wy0 * p00[t] + wy1 * p01[t]) + wx1 * (wy0 * p10[t] + wy1 * p11[t])
                        fb[2, t] = np.float32(z0 + t) + factor * u
                _corners(fb, ib, n, nx, ny, nz)
                _gather(flat, np.uint64(0), ib, g, n)
                # a = the trilinear sample (float32), as warp() computes it; kept in g[0]
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
                # float64 moments; a point without a corner inside contributes b only (a = 0 terms are skipped)
                b_row = fixed[x, y, z0:z1]
                for t in range(n):
                    inside = fb[9, t] != np.float32(0.0)
                    a = np.float64(g[0, t])
                    b = np.float64(b_row[t])
                    lanes[0, t] += a if inside else 0.0
                    lanes[1, t] += b
                    lanes[2, t] += a * a if inside else 0.0
                    lanes[3, t] += b * b
                    lanes[4, t] += a * b if inside else 0.0
    for x in range(x_start, x_stop):
        for k in range(5):
            s = 0.0
            for t in range(CHUNK):
                s += acc[x - x_start, k, t]
            partials[x, k] = s


@njit(parallel=True, cache=True, fastmath=False)
def _fused_sums(moving, fixed, planes, xi0, xi1, xw0, xw1, yi0, yi1, yw0, yw1, factor, tile):  # pragma: no cover
    """Per-slab sums of a, b, a*a, b*b, a*b (float64), ``a = warp(moving, factor * blend(planes))``, ``b = fixed``.

    ``moving`` and ``fixed`` are ``(X, Y, Z)``; ``planes`` the z-resized coarse flow
    ``(3, x, y, Z)``; the x and y tables come from ``upsample._axis_table``.
    Parallel over tiles of ``tile`` slabs; returns ``(X, 5)`` partials, one row
    per slab (see :func:`_score_tile`), which the caller adds in a fixed order.
    """
    nx = moving.shape[0]
    partials = np.zeros((nx, 5), dtype=np.float64)
    n_tiles = (nx + tile - 1) // tile
    for k in prange(n_tiles):
        _score_tile(moving, fixed, planes, xi0, xi1, xw0, xw1, yi0, yi1, yw0, yw1, factor,
                    k * tile, min(nx, (k + 1) * tile), partials)
    return partials


def _total(partials: np.ndarray) -> tuple[float, float, float, float, float]:
    """Column sums of ``(n, 5)`` float64 partials (in a fixed order) as five floats."""
    sa, sb, saa, sbb, sab = (float(v) for v in partials.sum(axis=0))
    return sa, sb, saa, sbb, sab


def _ncc_from_sums(n: int, sa: float, sb: float, saa: float, sbb: float, sab: float) -> float:
    """Global NCC from float64 sums: ``cov / (std_a std_b)``, unbiased std; 0.0 for a constant image."""
    var_a = saa - sa * sa / n  # (N - 1) * unbiased variance
    var_b = sbb - sb * sb / n
    if var_a <= _VAR_REL_TOL * saa or var_b <= _VAR_REL_TOL * sbb:
        return 0.0  # a constant image correlates with nothing
    cov = (sab - sa * sb / n) / n
    return float(cov / (math.sqrt(var_a / (n - 1)) * math.sqrt(var_b / (n - 1))))


def ncc(a: Any, b: Any) -> float:
    """Global NCC of SPEC 3: ``mean((a - ma)(b - mb)) / (std_a std_b)``.

    Unbiased standard deviations (divide by N - 1), float64 sums in two passes
    (means first), the counterpart of :func:`iirp.model.spatial.ncc`. Runs on
    the CPU with numba, parallel over chunks whose partial sums are added in a
    fixed order (independent of the thread count).

    Args:
        a, b: arrays of the same shape (any number of dimensions, at least 2
            elements), e.g. ``(X, Y, Z)`` volumes. Non-float32 input is
            converted with ``np.ascontiguousarray(x, dtype=np.float32)``.

    Returns:
        The NCC in [-1, 1] as a Python float; 0.0 when either image is constant.

    Raises:
        TypeError: a or b is not a real-valued array.
        ValueError: shapes differ or there are fewer than 2 elements.
    """
    a = as_float32("ncc", "a", a)
    b = as_float32("ncc", "b", b)
    check_shape("ncc", "b", b, a.shape)
    if a.size < 2:
        raise ValueError(f"ncc() 'a' needs at least 2 elements, got shape {tuple(a.shape)}")
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    n = flat_a.size
    sa, sb, _, _, _ = _total(_centered_sums(flat_a, flat_b, 0.0, 0.0))
    ma, mb = sa / n, sb / n
    # second pass about the means (the two-pass formula of iirp.model.spatial.ncc)
    _, _, saa, sbb, sab = _total(_centered_sums(flat_a, flat_b, ma, mb))
    denom = math.sqrt(saa / (n - 1)) * math.sqrt(sbb / (n - 1))
    if denom == 0.0:
        return 0.0  # a constant image correlates with nothing
    return float((sab / n) / denom)


def fused_ncc_score(moving: Any, fixed: Any, flow: Any, factor: int) -> float:
    """IterStop score ``ncc(warp(moving, upsample(flow, factor)), fixed)`` in one fused pass.

    For each full-resolution voxel p: the upsampled flow ``u(p)`` is computed on
    the fly (``factor`` times the align_corners=True trilinear resize, exactly as
    :func:`iirp.kernels.upsample`), the moving image is sampled at ``p + u(p)``
    (trilinear, zero padding, exactly as :func:`iirp.kernels.warp`), and the
    sums of a, b, a², b², ab are accumulated in float64 per slab of the first
    axis and added in slab order (independent of the thread count). Neither the
    full-resolution flow nor the warped image is stored; the only temporary is
    the coarse flow resized along z, ``(3, x, y, Z)`` (1/factor² of a full flow;
    none for factor 1). Runs on the CPU with numba, parallel over the first axis.

    The one-pass sums agree with the two-pass :func:`ncc` to ~1e-12 for [0, 1]
    images; a variance below 1e-10 of the mean square is taken as a constant image.

    Args:
        moving: ``(X, Y, Z)`` moving volume at full resolution.
        fixed: ``(X, Y, Z)`` fixed volume at full resolution.
        flow: ``(3, X/factor, Y/factor, Z/factor)`` displacement in voxels of the
            coarse level, component c along array axis c.
        factor: full / coarse resolution ratio, ``2 ** (level - 1)`` (1, 2, 4 or 8).

    Non-float32 or non-contiguous inputs are converted with
    ``np.ascontiguousarray(x, dtype=np.float32)`` first.

    Returns:
        The global NCC (unbiased std) as a Python float; 0.0 when either image is constant.

    Raises:
        TypeError: an input is not a real-valued array, or factor is not an integer.
        ValueError: moving is not 3-D, fixed's shape differs, factor < 1, or
            flow is not ``(3, X/factor, Y/factor, Z/factor)`` (including X, Y, Z
            not divisible by factor).
    """
    moving = as_float32("fused_ncc_score", "moving", moving)
    fixed = as_float32("fused_ncc_score", "fixed", fixed)
    flow = as_float32("fused_ncc_score", "flow", flow)
    factor = check_factor("fused_ncc_score", factor)
    check_ndim("fused_ncc_score", "moving", moving, "(X, Y, Z)", (3,))
    check_shape("fused_ncc_score", "fixed", fixed, moving.shape)
    if any(n % factor for n in moving.shape):
        raise ValueError(
            f"fused_ncc_score() 'moving' shape {tuple(moving.shape)} must be divisible by 'factor' {factor}"
        )
    check_shape("fused_ncc_score", "flow", flow, (3, *(n // factor for n in moving.shape)))
    n = moving.size
    if n < 2:
        raise ValueError(f"fused_ncc_score() 'moving' needs at least 2 voxels, got shape {tuple(moving.shape)}")
    _check_size("fused_ncc_score", moving.shape)
    planes, tx, ty = _flow_planes(flow, factor)
    # the blended flow is scaled by the factor inside the kernel (voxel-unit flow follows its grid)
    partials = _fused_sums(moving, fixed, planes, *tx, *ty, np.float32(factor), _tile_width(moving.shape[0]))
    return _ncc_from_sums(n, *_total(partials))
