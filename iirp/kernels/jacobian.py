"""Jacobian determinant of ``x -> x + u(x)`` for a voxel flow, by ITK's rule, on the CPU (numba).

The twin of SimpleITK's ``DisplacementFieldJacobianDeterminant`` applied to the displacement
field ``iirp-run`` writes (:func:`iirp.runtime.deformation.jacobian_determinant`), computed on the
model-grid flow instead of through a float64 copy of the field in mm. Per voxel, with
``s`` the grid spacing and neighbours clamped at the volume's faces (ITK's zero-flux Neumann
boundary)::

    J[j, i] = (0.5 * s[j] / s[i]) * (u_j(p + e_i) - u_j(p - e_i)) + (i == j)
    det J   = ITK's 3x3 ``vnl_det`` expansion, in float64

``u`` in voxels is the field in mm rotated into the index frame and divided by the spacing, so
``J`` here is ITK's ``J`` exactly up to rounding. Conventions: flows ``(3, X, Y, Z)`` float32
displacements in voxels, component c along array axis c.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numba import njit, prange

from iirp.kernels._checks import as_float32, check_ndim

__all__ = ["jacobian_determinant", "folding_count"]


@njit(cache=True)
def _det_at(flow, x, y, z, w):  # pragma: no cover - compiled
    nx, ny, nz = flow.shape[1], flow.shape[2], flow.shape[3]
    xp, xm = min(x + 1, nx - 1), max(x - 1, 0)
    yp, ym = min(y + 1, ny - 1), max(y - 1, 0)
    zp, zm = min(z + 1, nz - 1), max(z - 1, 0)
    m = np.empty((3, 3))
    for j in range(3):
        m[j, 0] = w[j, 0] * (np.float64(flow[j, xp, y, z]) - np.float64(flow[j, xm, y, z]))
        m[j, 1] = w[j, 1] * (np.float64(flow[j, x, yp, z]) - np.float64(flow[j, x, ym, z]))
        m[j, 2] = w[j, 2] * (np.float64(flow[j, x, y, zp]) - np.float64(flow[j, x, y, zm]))
    m[0, 0] += 1.0
    m[1, 1] += 1.0
    m[2, 2] += 1.0
    return (m[0, 0] * m[1, 1] * m[2, 2] - m[0, 0] * m[2, 1] * m[1, 2] - m[1, 0] * m[0, 1] * m[2, 2]
            + m[1, 0] * m[2, 1] * m[0, 2] + m[2, 0] * m[0, 1] * m[1, 2] - m[2, 0] * m[1, 1] * m[0, 2])


@njit(parallel=True, cache=True, fastmath=False)
def _det_kernel(flow, w, out):  # pragma: no cover - compiled
    nx, ny, nz = out.shape
    for x in prange(nx):
        for y in range(ny):
            for z in range(nz):
                out[x, y, z] = _det_at(flow, x, y, z, w)


@njit(parallel=True, cache=True, fastmath=False)
def _folding_kernel(flow, w):  # pragma: no cover - compiled
    nx, ny, nz = flow.shape[1], flow.shape[2], flow.shape[3]
    counts = np.zeros(nx, np.int64)
    for x in prange(nx):
        c = 0
        for y in range(ny):
            for z in range(nz):
                if not _det_at(flow, x, y, z, w) > 0.0:  # <= 0, NaN included
                    c += 1
        counts[x] = c
    return counts.sum()


def _weights(spacing: Sequence[float]) -> np.ndarray:
    s = np.asarray(spacing, dtype=np.float64)
    if s.shape != (3,) or not np.all(np.isfinite(s) & (s > 0)):
        raise ValueError(f"jacobian_determinant() 'spacing' must be 3 positive numbers, got {list(spacing)}")
    return 0.5 * s[:, None] / s[None, :]


def _flow(func: str, flow: np.ndarray) -> np.ndarray:
    flow = as_float32(func, "flow", flow)
    check_ndim(func, "flow", flow, "(3, X, Y, Z)", (4,))
    if flow.shape[0] != 3:
        raise ValueError(f"{func}() 'flow' must have shape (3, X, Y, Z), got {tuple(flow.shape)}")
    return flow


def jacobian_determinant(flow: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """``(X, Y, Z)`` float64 Jacobian determinant of a ``(3, X, Y, Z)`` voxel flow on a grid of ``spacing`` (mm)."""
    flow = _flow("jacobian_determinant", flow)
    out = np.empty(flow.shape[1:], np.float64)
    _det_kernel(flow, _weights(spacing), out)
    return out


def folding_count(flow: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> int:
    """How many voxels have a Jacobian determinant ``<= 0`` (or NaN), without storing the determinants."""
    flow = _flow("folding_count", flow)
    return int(_folding_kernel(flow, _weights(spacing)))
