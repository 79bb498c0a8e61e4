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

Arithmetic is float32 with ``fastmath`` off (no FMA contraction, no
reassociation); every output voxel is computed independently, so results are
deterministic and independent of the thread count. The helpers :func:`_axis` and :func:`_lerp3`
are shared with :mod:`iirp.kernels.score` so the fused score samples the
moving image bit for bit as :func:`warp` does.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from numba import njit, prange

from iirp.kernels._checks import as_float32, check_ndim, check_out, check_shape

__all__ = ["warp", "compose"]

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


def warp(src: np.ndarray, flow: np.ndarray, *, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``warp(src, u)(p) = src(p + u(p))``: trilinear, align_corners=True, zeros outside.

    Matches ``grid_sample(src[None], grid, padding_mode="zeros", align_corners=True)``
    (see :func:`iirp.model.spatial.warp`) to float32 rounding. Runs on the CPU
    with numba, parallel over the first spatial axis.

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
    src4 = src.reshape((-1, *spatial))
    _warp_kernel(src4, flow, result.reshape(src4.shape), False)
    return result


def compose(phi: np.ndarray, du: np.ndarray, *, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``compose(phi, du) = warp(phi, du) + du`` in one pass: apply du first, then phi.

    Bit for bit ``warp(phi, du) + du`` (same float32 arithmetic). Runs on the
    CPU with numba, parallel over the first spatial axis.

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
    _warp_kernel(phi, du, result, True)
    return result
