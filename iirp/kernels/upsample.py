"""Flow upsampling on the CPU (numba): ``up_s(u) = s * trilinear_resize(u, s x)``.

The numpy/numba counterpart of :func:`iirp.model.spatial.upsample_flow`, i.e.
``s * F.interpolate(u, scale s, mode="trilinear", align_corners=True)``.
With ``align_corners=True`` output index p on an axis of N = s*n voxels reads
the input at ``p * (n - 1) / (N - 1)``. The per-axis indices and weights are
computed in float32 the way PyTorch's CPU kernel computes them and the blend
runs in the same order (z innermost, then y, then x); PyTorch's CPU build
contracts each blend into fused multiply-adds, which numba (fastmath off) does
not, so the two agree to a few float32 ulps of the blended values.

Flows are ``(3, x, y, z)`` float32 displacements in voxels of their own grid,
component c along array axis c (see :mod:`iirp.runtime.geometry`). Since a
voxel-unit flow is measured on its grid, upsampling scales the vectors by s.

The helpers :func:`_axis_table` and :func:`_zlerp_planes` are shared with
:mod:`iirp.kernels.score`, which blends the planes exactly as :func:`_upsample_rows`
does, so the fused score sees exactly the upsampled flow that :func:`upsample` writes.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from numba import njit

from iirp.kernels._checks import as_float32, check_factor, check_ndim, check_out, check_shape
from iirp.kernels._parallel import parallel_for, work_buffer

__all__ = ["upsample", "upsample2"]

#: Per-axis resize table ``(i0, i1, w0, w1)``: int64 corner indices and float32 weights, each ``(size,)``.
_Table = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _axis_table(n: int, size: int) -> _Table:
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


@njit(nogil=True, cache=True, fastmath=False)
def _zlerp_planes(flow, k0, k1, wz0, wz1, planes, x_start, x_stop):  # pragma: no cover - compiled
    """Resize ``flow (3, x, y, z)`` along z only into ``planes (3, x, y, Z)``, coarse slabs ``x_start .. x_stop``.

    ``planes[c, x, y, Z] = wz0[Z] * flow[c, x, y, k0[Z]] + wz1[Z] * flow[c, x, y, k1[Z]]``
    (float32): the innermost blend of the trilinear resize, written in place.
    """
    nc, _, ny, _ = flow.shape
    nz = k0.shape[0]
    for x in range(x_start, x_stop):
        for c in range(nc):
            for y in range(ny):
                for z in range(nz):
                    planes[c, x, y, z] = wz0[z] * flow[c, x, y, k0[z]] + wz1[z] * flow[c, x, y, k1[z]]


@njit(nogil=True, cache=True, fastmath=False)
def _upsample_rows(planes, xi0, xi1, xw0, xw1, yi0, yi1, yw0, yw1, factor, out, x_start, x_stop):  # pragma: no cover
    """``out = factor * blend(planes)`` on the fine slabs ``x_start <= x < x_stop``.

    ``out[c, x, y, z] = factor * (wx0 * (wy0 * p00 + wy1 * p01) + wx1 * (wy0 * p10 + wy1 * p11))``
    with ``pij = planes[c, xi_i[x], yi_j[y], z]``: the z-resized planes blended over
    y, then x (float32, in exactly that order: e109593's ``_blend_xy`` and
    ``upsample.cu``), then scaled; a whole row at a time, so the z loop vectorizes.
    :func:`iirp.kernels._sampling.sample_tile` blends the planes the same way.
    """
    _, _, ny, nz = out.shape
    for x in range(x_start, x_stop):
        i0, i1, wx0, wx1 = xi0[x], xi1[x], xw0[x], xw1[x]
        for y in range(ny):
            j0, j1, wy0, wy1 = yi0[y], yi1[y], yw0[y], yw1[y]
            for c in range(3):
                p00 = planes[c, i0, j0]
                p01 = planes[c, i0, j1]
                p10 = planes[c, i1, j0]
                p11 = planes[c, i1, j1]
                row = out[c, x, y]
                for z in range(nz):
                    row[z] = factor * (wx0 * (wy0 * p00[z] + wy1 * p01[z]) + wx1 * (wy0 * p10[z] + wy1 * p11[z]))


def _flow_planes(flow: np.ndarray, factor: int) -> tuple[np.ndarray, _Table, _Table]:
    """Z-resized planes ``(3, x, y, factor*z)`` plus the x and y tables (internal, shared with score).

    For ``factor == 1`` the planes are ``flow`` itself (the z resize is the identity);
    otherwise they live in a work buffer of this thread, valid until the next call.
    """
    _, nx, ny, nz = flow.shape
    tx, ty, tz = (_axis_table(n, factor * n) for n in (nx, ny, nz))
    if factor == 1:
        return flow, tx, ty
    planes = work_buffer("planes", 3 * nx * ny * factor * nz).reshape((3, nx, ny, factor * nz))
    parallel_for(lambda a, b: _zlerp_planes(flow, *tz, planes, a, b), nx, planes.size)
    return planes, tx, ty


def upsample(flow: np.ndarray, factor: int, *, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``up_s(u) = s * trilinear_resize(u, s x, align_corners=True)`` for ``s = factor``.

    Matches ``factor * F.interpolate(flow[None], size=(s x, s y, s z),
    mode="trilinear", align_corners=True)`` (see :func:`iirp.model.spatial.upsample_flow`).
    Runs on the CPU with numba, on ``numba.get_num_threads()`` threads over
    ranges of the first spatial axis.

    Args:
        flow: ``(3, x, y, z)`` displacement in voxels of the coarse grid,
            component c along array axis c.
        factor: integer scale s >= 1 (2 between pyramid levels).
        out: optional C-contiguous float32 ``(3, s x, s y, s z)`` buffer, written
            in place and returned; must not overlap ``flow``.

    Non-float32 or non-contiguous input is converted with
    ``np.ascontiguousarray(flow, dtype=np.float32)`` first.

    Returns:
        ``(3, s x, s y, s z)`` float32 displacement in voxels of the fine grid
        (``out`` when given).

    Raises:
        TypeError: flow is not a real-valued array, or factor is not an integer.
        ValueError: flow is not ``(3, x, y, z)``, factor < 1, or ``out`` is unusable.
    """
    flow = as_float32("upsample", "flow", flow)
    factor = check_factor("upsample", factor)
    check_ndim("upsample", "flow", flow, "(3, x, y, z)", (4,))
    if flow.shape[0] != 3:
        check_shape("upsample", "flow", flow, (3, *flow.shape[1:]))
    shape = (3, *(factor * n for n in flow.shape[1:]))
    result = check_out("upsample", out, shape, {"flow": flow})
    if factor == 1:
        np.copyto(result, flow)  # PyTorch copies when the size is unchanged
        return result
    planes, tx, ty = _flow_planes(flow, factor)
    # a voxel-unit flow is rescaled with its grid: multiply by the factor
    scale = np.float32(factor)
    parallel_for(lambda a, b: _upsample_rows(planes, *tx, *ty, scale, result, a, b), shape[1], result.size)
    return result


def upsample2(flow: np.ndarray, *, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``up2(u) = 2 * trilinear_resize(u, 2x, align_corners=True)``: :func:`upsample` with factor 2.

    Args:
        flow: ``(3, x, y, z)`` displacement in voxels of the coarse grid.
        out: optional C-contiguous float32 ``(3, 2x, 2y, 2z)`` buffer, written in place and returned.

    Returns:
        ``(3, 2x, 2y, 2z)`` float32 displacement in voxels of the fine grid.

    Raises:
        TypeError, ValueError: as :func:`upsample`.
    """
    flow = as_float32("upsample2", "flow", flow)
    check_ndim("upsample2", "flow", flow, "(3, x, y, z)", (4,))
    if flow.shape[0] != 3:
        check_shape("upsample2", "flow", flow, (3, *flow.shape[1:]))
    if out is not None:
        check_out("upsample2", out, (3, *(2 * n for n in flow.shape[1:])), {"flow": flow})
    return upsample(flow, 2, out=out)
