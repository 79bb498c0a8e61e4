"""Frozen copy of the numba kernels of commit e109593 (before the speed-up): the reference for bit-identity.

``tests/kernels/test_bit_identity.py`` compares the current kernels against these on random inputs, and
``benchmarks/kernels_cpu.py`` times them against the current ones. Arithmetic, loop order and the
float64 summation order are exactly those of e109593 (``iirp/kernels/warp.py``, ``upsample.py``,
``score.py``); only the argument checks are left out (callers pass C-contiguous float32 arrays).
Do not edit: this file is the "before" of a before/after comparison.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_MINUS_ONE = np.float32(-1.0)


@njit(cache=True)
def _axis(t, n):  # pragma: no cover - compiled
    """Corners and weights of float32 coordinate ``t`` on an axis of ``n`` voxels.

    Returns ``(i0, i1, w0, w1)``: the two corner indices, clamped into
    ``[0, n)``, and their weights, set to 0 for a corner outside the axis
    (zero padding). The caller guarantees ``-1 < t < n``, so no index overflows.
    """
    f = np.floor(t)
    w1 = t - f
    w0 = _ONE - w1
    i0 = np.int64(f)
    i1 = i0 + 1
    if i0 < 0:  # only i0 == -1 is possible here
        i0 = 0
        w0 = _ZERO
    if i1 > n - 1:  # only i1 == n is possible here
        i1 = n - 1
        w1 = _ZERO
    return i0, i1, w0, w1


@njit(cache=True)
def _inside(x, y, z, nx, ny, nz):  # pragma: no cover - compiled
    """True when at least one corner of float32 ``(x, y, z)`` can lie in the volume; False for NaN and inf."""
    return (
        x > _MINUS_ONE and x < np.float32(nx)
        and y > _MINUS_ONE and y < np.float32(ny)
        and z > _MINUS_ONE and z < np.float32(nz)
    )


@njit(cache=True)
def _lerp3(vol, i0, i1, j0, j1, k0, k1, wx0, wx1, wy0, wy1, wz0, wz1):  # pragma: no cover - compiled
    """Trilinear blend of the 3-D volume ``vol`` at the given corners: z innermost, then y, then x."""
    v00 = wz0 * vol[i0, j0, k0] + wz1 * vol[i0, j0, k1]
    v01 = wz0 * vol[i0, j1, k0] + wz1 * vol[i0, j1, k1]
    v10 = wz0 * vol[i1, j0, k0] + wz1 * vol[i1, j0, k1]
    v11 = wz0 * vol[i1, j1, k0] + wz1 * vol[i1, j1, k1]
    return wx0 * (wy0 * v00 + wy1 * v01) + wx1 * (wy0 * v10 + wy1 * v11)


@njit(parallel=True, cache=True, fastmath=False)
def _warp_kernel(src, flow, out, add_flow):  # pragma: no cover - compiled
    """``out[c, p] = src[c](p + flow[:, p])`` (+ ``flow[c, p]`` when ``add_flow``); prange over x."""
    nc, nx, ny, nz = src.shape
    for x in prange(nx):
        fx = np.float32(x)
        for y in range(ny):
            fy = np.float32(y)
            for z in range(nz):
                px = fx + flow[0, x, y, z]
                py = fy + flow[1, x, y, z]
                pz = np.float32(z) + flow[2, x, y, z]
                if _inside(px, py, pz, nx, ny, nz):
                    i0, i1, wx0, wx1 = _axis(px, nx)
                    j0, j1, wy0, wy1 = _axis(py, ny)
                    k0, k1, wz0, wz1 = _axis(pz, nz)
                    for c in range(nc):
                        v = _lerp3(src[c], i0, i1, j0, j1, k0, k1, wx0, wx1, wy0, wy1, wz0, wz1)
                        if add_flow:
                            v = v + flow[c, x, y, z]
                        out[c, x, y, z] = v
                else:
                    for c in range(nc):
                        out[c, x, y, z] = flow[c, x, y, z] if add_flow else _ZERO



def _axis_table(n: int, size: int) -> tuple:
    """Linear-resize table from ``n`` to ``size`` samples with align_corners=True.

    Mirrors PyTorch's CPU ``compute_indices_weights_linear``: float32 scale
    ``(n - 1) / (size - 1)``, source ``scale * p``, ``i0 = min(floor, n - 1)``,
    ``w1 = clamp(source - i0, 0, 1)``, ``w0 = 1 - w1``, ``i1 = i0 + (i0 < n - 1)``;
    and the identity when ``size == n``.

    Returns:
        ``(i0, i1, w0, w1)``: int64 indices and float32 weights, each ``(size,)``.
    """
    p = np.arange(size, dtype=np.int64)
    if size == n:
        return p, p.copy(), np.ones(size, np.float32), np.zeros(size, np.float32)
    scale = np.float32(n - 1) / np.float32(size - 1) if size > 1 else np.float32(0.0)
    source = scale * p.astype(np.float32)  # float32, like PyTorch's opmath for float input
    i0 = np.minimum(np.floor(source).astype(np.int64), n - 1)
    w1 = np.clip(source - i0.astype(np.float32), np.float32(0.0), np.float32(1.0)).astype(np.float32)
    w0 = (np.float32(1.0) - w1).astype(np.float32)
    i1 = i0 + (i0 < n - 1)
    return i0, i1, w0, w1


@njit(cache=True, fastmath=False)
def _zlerp_planes(flow, k0, k1, wz0, wz1):  # pragma: no cover - compiled
    """Resize along z only: ``(3, x, y, z) -> (3, x, y, Z)`` (the innermost blend).

    Serial: it touches 1/factor² of the output voxels (about 2 ms at full size
    for factor 2), and a parallel loop would cost seconds more of compilation.
    """
    nc, nx, ny, _ = flow.shape
    nz = k0.shape[0]
    planes = np.empty((nc, nx, ny, nz), dtype=np.float32)
    for x in range(nx):
        for c in range(nc):
            for y in range(ny):
                for z in range(nz):
                    planes[c, x, y, z] = wz0[z] * flow[c, x, y, k0[z]] + wz1[z] * flow[c, x, y, k1[z]]
    return planes


@njit(cache=True)
def _blend_xy(planes, i0, i1, j0, j1, wx0, wx1, wy0, wy1, z):  # pragma: no cover - compiled
    """Blend z-resized planes over y then x at one output voxel: the 3 trilinear components, unscaled."""
    u0 = wx0 * (wy0 * planes[0, i0, j0, z] + wy1 * planes[0, i0, j1, z]) + wx1 * (
        wy0 * planes[0, i1, j0, z] + wy1 * planes[0, i1, j1, z]
    )
    u1 = wx0 * (wy0 * planes[1, i0, j0, z] + wy1 * planes[1, i0, j1, z]) + wx1 * (
        wy0 * planes[1, i1, j0, z] + wy1 * planes[1, i1, j1, z]
    )
    u2 = wx0 * (wy0 * planes[2, i0, j0, z] + wy1 * planes[2, i0, j1, z]) + wx1 * (
        wy0 * planes[2, i1, j0, z] + wy1 * planes[2, i1, j1, z]
    )
    return u0, u1, u2


@njit(parallel=True, cache=True, fastmath=False)
def _upsample_kernel(planes, xi0, xi1, xw0, xw1, yi0, yi1, yw0, yw1, factor, out):  # pragma: no cover
    """``out[:, x, y, z] = factor * blend`` over z-resized ``planes``; prange over x."""
    _, nx, ny, nz = out.shape
    for x in prange(nx):
        i0, i1, wx0, wx1 = xi0[x], xi1[x], xw0[x], xw1[x]
        for y in range(ny):
            j0, j1, wy0, wy1 = yi0[y], yi1[y], yw0[y], yw1[y]
            for z in range(nz):
                u0, u1, u2 = _blend_xy(planes, i0, i1, j0, j1, wx0, wx1, wy0, wy1, z)
                out[0, x, y, z] = factor * u0
                out[1, x, y, z] = factor * u1
                out[2, x, y, z] = factor * u2


def _flow_planes(flow: np.ndarray, factor: int) -> tuple[np.ndarray, tuple, tuple]:
    """Z-resized planes ``(3, x, y, factor*z)`` plus the x and y tables (internal, shared with score).

    For ``factor == 1`` the planes are ``flow`` itself (the z resize is the identity).
    """
    _, nx, ny, nz = flow.shape
    tx, ty, tz = (_axis_table(n, factor * n) for n in (nx, ny, nz))
    planes = flow if factor == 1 else _zlerp_planes(flow, *tz)
    return planes, tx, ty



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


@njit(cache=True, fastmath=False)
def _fused_slab(moving, fixed, planes, xi0, xi1, xw0, xw1, yi0, yi1, yw0, yw1, factor, x):  # pragma: no cover
    """Sums of a, b, a*a, b*b, a*b (float64) over the slab ``x`` of the fused score (serial)."""
    nx, ny, nz = moving.shape
    i0, i1, wx0, wx1 = xi0[x], xi1[x], xw0[x], xw1[x]
    fx = np.float32(x)
    sa = 0.0
    sb = 0.0
    saa = 0.0
    sbb = 0.0
    sab = 0.0
    for y in range(ny):
        j0, j1, wy0, wy1 = yi0[y], yi1[y], yw0[y], yw1[y]
        fy = np.float32(y)
        for z in range(nz):
            # the upsampled flow at (x, y, z), as upsample() writes it (vectors scaled by the factor)
            u0, u1, u2 = _blend_xy(planes, i0, i1, j0, j1, wx0, wx1, wy0, wy1, z)
            px = fx + factor * u0
            py = fy + factor * u1
            pz = np.float32(z) + factor * u2
            b = np.float64(fixed[x, y, z])
            sb += b
            sbb += b * b
            if _inside(px, py, pz, nx, ny, nz):
                m0, m1, vx0, vx1 = _axis(px, nx)
                n0, n1, vy0, vy1 = _axis(py, ny)
                k0, k1, vz0, vz1 = _axis(pz, nz)
                a = np.float64(_lerp3(moving, m0, m1, n0, n1, k0, k1, vx0, vx1, vy0, vy1, vz0, vz1))
                sa += a
                saa += a * a
                sab += a * b
    return sa, sb, saa, sbb, sab


@njit(parallel=True, cache=True, fastmath=False)
def _fused_sums(moving, fixed, planes, xi0, xi1, xw0, xw1, yi0, yi1, yw0, yw1, factor):  # pragma: no cover
    """Per-slab sums of a, b, a*a, b*b, a*b (float64), ``a = warp(moving, factor * blend(planes))``, ``b = fixed``.

    ``moving`` and ``fixed`` are ``(X, Y, Z)``; ``planes`` the z-resized coarse flow
    ``(3, x, y, Z)``; the x and y tables come from ``upsample._axis_table``.
    Parallel over slabs x; returns ``(X, 5)`` partials, one row per slab, which
    the caller adds in a fixed order (independent of the thread count).
    """
    nx = moving.shape[0]
    partials = np.zeros((nx, 5), dtype=np.float64)
    for x in prange(nx):
        sums = _fused_slab(moving, fixed, planes, xi0, xi1, xw0, xw1, yi0, yi1, yw0, yw1, factor, x)
        for k in range(5):
            partials[x, k] = sums[k]
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


def warp(src: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """e109593 ``iirp.kernels.warp`` (no argument checks)."""
    spatial = src.shape[-3:]
    out = np.empty(src.shape, dtype=np.float32)
    src4 = src.reshape((-1, *spatial))
    _warp_kernel(src4, flow, out.reshape(src4.shape), False)
    return out


def compose(phi: np.ndarray, du: np.ndarray) -> np.ndarray:
    """e109593 ``iirp.kernels.compose`` (no argument checks)."""
    out = np.empty(phi.shape, dtype=np.float32)
    _warp_kernel(phi, du, out, True)
    return out


def upsample(flow: np.ndarray, factor: int) -> np.ndarray:
    """e109593 ``iirp.kernels.upsample`` (no argument checks)."""
    out = np.empty((3, *(factor * n for n in flow.shape[1:])), dtype=np.float32)
    if factor == 1:
        np.copyto(out, flow)
        return out
    planes, tx, ty = _flow_planes(flow, factor)
    _upsample_kernel(planes, *tx, *ty, np.float32(factor), out)
    return out


def upsample2(flow: np.ndarray) -> np.ndarray:
    """e109593 ``iirp.kernels.upsample2`` (no argument checks)."""
    return upsample(flow, 2)


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """e109593 ``iirp.kernels.ncc`` (no argument checks)."""
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    n = flat_a.size
    sa, sb, _, _, _ = _total(_centered_sums(flat_a, flat_b, 0.0, 0.0))
    ma, mb = sa / n, sb / n
    _, _, saa, sbb, sab = _total(_centered_sums(flat_a, flat_b, ma, mb))
    denom = math.sqrt(saa / (n - 1)) * math.sqrt(sbb / (n - 1))
    if denom == 0.0:
        return 0.0
    return float((sab / n) / denom)


def fused_sums(moving: np.ndarray, fixed: np.ndarray, flow: np.ndarray, factor: int) -> np.ndarray:
    """The e109593 fused score's ``(X, 5)`` per-slab float64 partials (sums of a, b, a², b², ab)."""
    planes, tx, ty = _flow_planes(flow, factor)
    return _fused_sums(moving, fixed, planes, *tx, *ty, np.float32(factor))


def fused_ncc_score(moving: np.ndarray, fixed: np.ndarray, flow: np.ndarray, factor: int) -> float:
    """e109593 ``iirp.kernels.fused_ncc_score`` (no argument checks)."""
    return _ncc_from_sums(moving.size, *_total(fused_sums(moving, fixed, flow, factor)))
