"""Output resampling by a voxel flow, by ITK's rules, on the CPU (numba): what ``iirp-run`` writes.

The network's own warp (:func:`iirp.kernels.warp`) samples as ``grid_sample`` does (each corner
outside the volume contributes 0). The images ``iirp-run`` writes must instead equal what ITK and
ANTs produce from the written displacement field, so these two follow ITK:

* :func:`warp_image`: ITK's ``LinearInterpolateImageFunction`` inside ``ResampleImageFilter``. A
  point is inside when ``-1/2 <= t < n - 1/2`` on every axis (else 0); per axis the lower
  neighbour is ``b = max(floor(t), 0)`` with weight from ``d = t - b``, and there is no upper
  neighbour when ``d <= 0`` or ``b + 1 > n - 1`` (the edge voxel's value holds for the half voxel
  beyond it). Lerps ``v0 + (v1 - v0) * d`` along axis 0, then 1, then 2, in float64, rounded once
  to float32 (ITK's order and precision).
* :func:`warp_labels`: ITK's nearest neighbour: ``round(t) = floor(t) + (t - floor(t) >= 1/2)``
  (half up), the same inside test, labels copied unchanged. The twin of
  :func:`iirp.kernels.cuda_ops.warp_labels` (``iirp_warp_nearest`` in ``cuda/warp.cu``), operation
  for operation.

Sample points ``t = p + u(p)`` are formed in float64, where the sum of an index and a float32 is
exact (a float32 sum could itself round onto or off a half-voxel tie; ITK computes in double).

Conventions (see :mod:`iirp.runtime.geometry`): volumes ``(X, Y, Z)``, flows ``(3, X, Y, Z)``
float32 displacements in voxels, component c along array axis c (ITK's index axis c).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from numba import njit, prange

from iirp.kernels._checks import as_float32, check_ndim, check_shape

__all__ = ["warp_image", "warp_labels"]


@njit(cache=True)
def _sample_point(flow, x, y, z):  # pragma: no cover - compiled
    """``t = p + u(p)`` at voxel ``p = (x, y, z)``, in float64 (exact)."""
    return (np.float64(x) + np.float64(flow[0, x, y, z]), np.float64(y) + np.float64(flow[1, x, y, z]),
            np.float64(z) + np.float64(flow[2, x, y, z]))


@njit(cache=True)
def _inside(t, n):  # pragma: no cover - compiled
    """ITK's inside test on an axis of ``n`` voxels: ``-1/2 <= t < n - 1/2`` (False for NaN)."""
    return t >= -0.5 and t < np.float64(n) - 0.5


@njit(cache=True)
def _nearest(t, n):  # pragma: no cover - compiled
    """Index of float64 ``t`` rounded half up on an axis of ``n`` voxels, or -1 outside (NaN included)."""
    if not _inside(t, n):
        return -1
    f = np.floor(t)
    return np.int64(f) + (1 if t - f >= 0.5 else 0)


@njit(parallel=True, cache=True, fastmath=False)
def _warp_labels_kernel(labels, flow, out):  # pragma: no cover - compiled
    nx, ny, nz = labels.shape
    for x in prange(nx):
        for y in range(ny):
            for z in range(nz):
                tx, ty, tz = _sample_point(flow, x, y, z)
                i = _nearest(tx, nx)
                j = _nearest(ty, ny)
                k = _nearest(tz, nz)
                out[x, y, z] = 0 if (i < 0 or j < 0 or k < 0) else labels[i, j, k]


@njit(cache=True)
def _linear_axis(t, n):  # pragma: no cover - compiled
    """``(lower index, upper index, weight of upper)`` of ITK's linear rule on one axis, for an inside ``t``."""
    b = np.int64(np.floor(t))
    if b < 0:
        b = 0
    d = t - np.float64(b)
    if d <= 0.0 or b + 1 > n - 1:
        return b, b, 0.0
    return b, b + 1, d


@njit(parallel=True, cache=True, fastmath=False)
def _warp_image_kernel(image, flow, out):  # pragma: no cover - compiled
    nx, ny, nz = image.shape
    for x in prange(nx):
        for y in range(ny):
            for z in range(nz):
                tx, ty, tz = _sample_point(flow, x, y, z)
                if not (_inside(tx, nx) and _inside(ty, ny) and _inside(tz, nz)):
                    out[x, y, z] = 0.0
                    continue
                i0, i1, dx = _linear_axis(tx, nx)
                j0, j1, dy = _linear_axis(ty, ny)
                k0, k1, dz = _linear_axis(tz, nz)
                v000 = np.float64(image[i0, j0, k0])
                v100 = np.float64(image[i1, j0, k0])
                v010 = np.float64(image[i0, j1, k0])
                v110 = np.float64(image[i1, j1, k0])
                v001 = np.float64(image[i0, j0, k1])
                v101 = np.float64(image[i1, j0, k1])
                v011 = np.float64(image[i0, j1, k1])
                v111 = np.float64(image[i1, j1, k1])
                vx00 = v000 + (v100 - v000) * dx
                vx10 = v010 + (v110 - v010) * dx
                vx01 = v001 + (v101 - v001) * dx
                vx11 = v011 + (v111 - v011) * dx
                vxy0 = vx00 + (vx10 - vx00) * dy
                vxy1 = vx01 + (vx11 - vx01) * dy
                out[x, y, z] = np.float32(vxy0 + (vxy1 - vxy0) * dz)


def _check(func: str, name: str, volume: np.ndarray, flow: np.ndarray) -> np.ndarray:
    flow = as_float32(func, "flow", flow)
    check_ndim(func, name, volume, "(X, Y, Z)", (3,))
    check_shape(func, "flow", flow, (3, *volume.shape))
    return flow


def _check_out(func: str, out: Optional[np.ndarray], like: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if out is None:
        return np.empty(like.shape, dtype=dtype)
    if not (isinstance(out, np.ndarray) and out.shape == like.shape and out.dtype == dtype
            and out.flags.c_contiguous and out.flags.writeable) or np.may_share_memory(out, like):
        raise ValueError(f"{func}() 'out' must be a writeable C-contiguous {dtype} array of shape "
                         f"{like.shape} that does not overlap the input")
    return out


def warp_image(image: np.ndarray, flow: np.ndarray, *, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Linear warp of an ``(X, Y, Z)`` volume by a ``(3, X, Y, Z)`` voxel flow, by ITK's rule (module docstring).

    Args:
        image: ``(X, Y, Z)`` real array (converted to C-contiguous float32, as ``iirp-run`` reads images).
        flow: ``(3, X, Y, Z)`` displacement in voxels (converted to C-contiguous float32).
        out: optional C-contiguous float32 array of the image's shape, written in place and returned.

    Returns:
        The warped volume, float32.

    Raises:
        TypeError: a non-real input.
        ValueError: wrong shapes, or a bad ``out``.
    """
    image = as_float32("warp_image", "image", image)
    flow = _check("warp_image", "image", image, flow)
    out = _check_out("warp_image", out, image, np.dtype(np.float32))
    _warp_image_kernel(image, flow, out)
    return out


def warp_labels(labels: np.ndarray, flow: np.ndarray, *, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Nearest-neighbour warp of an ``(X, Y, Z)`` integer label map by a ``(3, X, Y, Z)`` voxel flow (ITK's rule).

    Args:
        labels: ``(X, Y, Z)`` integer array (its dtype is kept).
        flow: ``(3, X, Y, Z)`` displacement in voxels (converted to C-contiguous float32).
        out: optional C-contiguous array of labels' shape and dtype, written in place and returned.

    Returns:
        The warped labels, labels' shape and dtype (``out`` when given).

    Raises:
        TypeError: labels are not integers, or flow is not real-valued.
        ValueError: wrong shapes, or ``out`` of another shape, dtype or layout.
    """
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"warp_labels() 'labels' must be an integer array, got dtype {labels.dtype}")
    labels = np.ascontiguousarray(labels)
    flow = _check("warp_labels", "labels", labels, flow)
    out = _check_out("warp_labels", out, labels, labels.dtype)
    _warp_labels_kernel(labels, flow, out)
    return out
