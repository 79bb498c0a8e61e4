"""Global NCC and the fused IterStop score on the CPU (numba).

SPEC section 3/5: ``score(phi at level i) = NCC(warp(m, up_s(phi)), f)`` with
``s = 2 ** (i - 1)`` and the global NCC
``mean((a - mean a) * (b - mean b)) / (std a * std b)`` (unbiased std, N - 1).

:func:`fused_ncc_score` computes that score in one pass over the full-resolution
grid without materialising the upsampled flow or the warped image: for every
voxel it blends the coarse flow (exactly as :func:`iirp.kernels.upsample` does),
samples the moving image (exactly as :func:`iirp.kernels.warp` does; the
shared kernel is :func:`iirp.kernels._sampling.sample_tile`) and accumulates
five float64 sums. The per-voxel terms a (the sample) and b (the fixed value)
are bit for bit those of e109593 and of the CUDA ``score.cu``; the additions
run in another fixed order (per slab of the first axis, ``CHUNK`` lanes along
z, then lanes in order, then slabs in order), which depends on the shape only,
not on the thread count, and moves the score by ~1e-14 against e109593.

Conventions: see :mod:`iirp.runtime.geometry` (volumes ``(X, Y, Z)``, flows
``(3, x, y, z)`` in voxels of their own grid, component c along axis c;
trilinear sampling with align_corners=True and zero padding).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit

from iirp.kernels._checks import as_float32, check_factor, check_ndim, check_shape
from iirp.kernels._parallel import parallel_for
from iirp.kernels._sampling import SCORE, sample_tile
from iirp.kernels.upsample import _flow_planes
from iirp.kernels.warp import _check_size

__all__ = ["ncc", "fused_ncc_score"]

#: A one-pass variance below this fraction of the mean square is rounding noise
#: of the float64 sums (their relative error is ~1e-12 at 5M voxels): treat it as 0.
_VAR_REL_TOL = 1e-10


_CHUNK = 1 << 16  # elements per partial sum of ncc()


@njit(nogil=True, cache=True, fastmath=False)
def _centered_chunks(a, b, ma, mb, partials, first, stop):  # pragma: no cover - compiled
    """Rows ``first <= k < stop`` of ``partials``: float64 sums of da, db, da*da, db*db, da*db over chunk k.

    ``da = a - ma``, ``db = b - mb`` with ``a``, ``b`` flat float32; chunk k is
    elements ``[k * _CHUNK, (k + 1) * _CHUNK)``, summed serially in element order.
    """
    n = a.shape[0]
    for chunk in range(first, stop):
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


def _centered_sums(a: np.ndarray, b: np.ndarray, ma: float, mb: float) -> np.ndarray:
    """``(n_chunks, 5)`` partial sums of :func:`_centered_chunks`, chunks spread over threads.

    The caller adds the rows in a fixed order, so the result does not depend on the thread count.
    """
    n_chunks = -(-a.shape[0] // _CHUNK)
    partials = np.zeros((n_chunks, 5), dtype=np.float64)
    parallel_for(lambda first, stop: _centered_chunks(a, b, ma, mb, partials, first, stop), n_chunks, a.shape[0])
    return partials


def _fused_sums(moving: np.ndarray, fixed: np.ndarray, flow: np.ndarray, factor: int) -> np.ndarray:
    """Per-slab sums of a, b, a*a, b*b, a*b (float64), ``a = warp(moving, up_factor(flow))``, ``b = fixed``.

    Returns ``(X, 5)`` partials, one row per slab of the first axis (see
    :func:`iirp.kernels._sampling.sample_tile` for the summation order), which
    the caller adds in a fixed order: independent of the thread count.
    """
    planes, tx, ty = _flow_planes(flow, factor)
    partials = np.zeros((moving.shape[0], 5), dtype=np.float64)
    src = moving[None]
    scale = np.float32(factor)  # the blended flow is scaled with its grid inside the kernel
    parallel_for(lambda a, b: sample_tile(src, planes, *tx, *ty, scale, SCORE, src, fixed, partials, a, b, 0),
                 moving.shape[0], moving.size)
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
    the CPU with numba, on ``numba.get_num_threads()`` threads over chunks of
    65536 elements whose partial sums are added in a fixed order (independent of
    the thread count).

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
    the coarse flow resized along z, ``(3, x, y, Z)`` (1/factor² of a full flow,
    kept in a work buffer of this thread between calls; none for factor 1). Runs
    on the CPU with numba, on ``numba.get_num_threads()`` threads over ranges of
    the first axis.

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
    partials = _fused_sums(moving, fixed, flow, factor)
    return _ncc_from_sums(n, *_total(partials))
