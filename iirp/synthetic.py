"""Synthetic registration pairs with a known ground-truth flow (numpy and the numba kernels, no torch).

A pair is made from one volume ``V`` (``(X, Y, Z)``, NIfTI (i, j, k) order) by two
random smooth deformations, both in the toolkit's flow convention
(:mod:`iirp.runtime.geometry`: ``(3, X, Y, Z)`` float32 voxel displacements,
component c along array axis c, a fixed point x maps to the moving point x + u(x)):

* a *base* deformation ``b``: ``moving = V o (id + b)`` = ``warp(V, b)``;
* the *true* flow ``u``: ``fixed = warp(moving, u)`` = ``warp(V, compose(b, u))`` with
  ``compose(b, u) = warp(b, u) + u`` (apply u first, then b; SPEC section 3).

So registering ``moving`` to ``fixed`` with ``u`` reproduces ``fixed`` (up to
interpolation), and both images went through exactly one resampling of ``V``.
Each deformation is a cubic B-spline whose control coefficients are drawn
uniformly in ``[-bound, bound]`` voxels per component, with ``bound`` at most
0.4 control spacings, the sufficient condition for a folding-free cubic B-spline
(Rueckert et al. 2006); :func:`jacobian_determinant` checks it numerically.
Optional intensity changes (gamma, a smooth multiplicative bias field, noise) are
applied to each image independently after warping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from iirp.kernels import compose, warp

__all__ = [
    "FOLDING_FREE_RATIO",
    "SyntheticPair",
    "random_flow",
    "random_intensity",
    "warp_labels",
    "make_pair",
    "jacobian_determinant",
    "endpoint_error",
]

#: Coefficient bound / control spacing below which a cubic B-spline is folding-free.
FOLDING_FREE_RATIO = 0.4

Seed = Union[int, np.random.Generator, None]


def _rng(seed: Seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _check_shape(func: str, shape: Sequence[int]) -> tuple[int, int, int]:
    dims = tuple(int(s) for s in shape)
    if len(dims) != 3 or min(dims) < 2:
        raise ValueError(f"{func}() 'shape' must be 3 extents >= 2, got {tuple(shape)}")
    return dims  # type: ignore[return-value]


def _bspline_basis(n: int, mesh: int) -> np.ndarray:
    """``(n, mesh + 3)`` float64 cubic B-spline weights of voxels 0..n-1 on a uniform mesh.

    The mesh has ``mesh`` intervals over ``[0, n - 1]``; control point k sits at
    ``(k - 1) * h`` with ``h = (n - 1) / mesh``. Each row sums to 1 (partition of unity).
    """
    u = np.arange(n, dtype=np.float64) * mesh / max(n - 1, 1)
    cell = np.minimum(np.floor(u).astype(np.int64), mesh - 1)
    f = u - cell
    weights = np.stack([(1 - f) ** 3, 3 * f**3 - 6 * f**2 + 4, -3 * f**3 + 3 * f**2 + 3 * f + 1, f**3], axis=1) / 6.0
    basis = np.zeros((n, mesh + 3), dtype=np.float64)
    for j in range(4):
        basis[np.arange(n), cell + j] = weights[:, j]
    return basis


def _bspline_field(shape: tuple[int, int, int], coefficients: np.ndarray) -> np.ndarray:
    """Dense ``(C, X, Y, Z)`` float32 cubic B-spline of ``(C, mx+3, my+3, mz+3)`` control coefficients."""
    bx, by, bz = (_bspline_basis(n, c - 3) for n, c in zip(shape, coefficients.shape[1:]))
    dense = np.einsum("xa,cabd->cxbd", bx, coefficients)
    dense = np.einsum("yb,cxbd->cxyd", by, dense)
    dense = np.einsum("zd,cxyd->cxyz", bz, dense)
    return np.ascontiguousarray(dense, dtype=np.float32)


def random_flow(
    shape: Sequence[int], seed: Seed = None, *, max_displacement: float = 4.0, control_spacing: float = 16.0
) -> np.ndarray:
    """A random smooth, folding-free displacement field.

    Args:
        shape: ``(X, Y, Z)`` extents in voxels.
        seed: an int, a ``numpy.random.Generator`` (advanced in place) or None.
        max_displacement: coefficient bound in voxels per component; clipped to
            :data:`FOLDING_FREE_RATIO` x the control spacing. The field never exceeds it.
        control_spacing: approximate B-spline control-point spacing in voxels (>= 2).

    Returns:
        ``(3, X, Y, Z)`` float32 displacement in voxels, component c along axis c.

    Raises:
        ValueError: bad shape, negative ``max_displacement`` or ``control_spacing`` < 2.
    """
    dims = _check_shape("random_flow", shape)
    if not max_displacement >= 0:
        raise ValueError(f"random_flow() 'max_displacement' must be >= 0 voxels, got {max_displacement}")
    if not control_spacing >= 2:
        raise ValueError(f"random_flow() 'control_spacing' must be >= 2 voxels, got {control_spacing}")
    rng = _rng(seed)
    mesh = [max(1, int(round((n - 1) / control_spacing))) for n in dims]
    actual_spacing = min((n - 1) / m for n, m in zip(dims, mesh))
    bound = min(float(max_displacement), FOLDING_FREE_RATIO * actual_spacing)
    # cubic: mesh + 3 control points per axis; component c displaces along axis c
    coefficients = rng.uniform(-bound, bound, size=(3, *[m + 3 for m in mesh]))
    return _bspline_field(dims, coefficients)


def _smooth_scalar(shape: tuple[int, int, int], rng: np.random.Generator, mesh: int = 2) -> np.ndarray:
    """A smooth random ``(X, Y, Z)`` float32 field in [-1, 1] (one B-spline component)."""
    return _bspline_field(shape, rng.uniform(-1.0, 1.0, size=(1, mesh + 3, mesh + 3, mesh + 3)))[0]


def random_intensity(
    image: np.ndarray, seed: Seed = None, *, gamma: float = 0.25, bias: float = 0.15, noise: float = 0.01
) -> np.ndarray:
    """Random intensity change of a [0, 1] image: gamma, smooth multiplicative bias, Gaussian noise.

    ``clip((image ** g) * (1 + bias * s(x)) + N(0, noise), 0, 1)`` with
    ``g = exp(U(-gamma, gamma))`` and ``s`` a smooth random field in [-1, 1].

    Args:
        image: ``(X, Y, Z)`` float volume in [0, 1].
        seed: int, Generator (advanced in place) or None.

    Returns:
        ``(X, Y, Z)`` float32 in [0, 1].
    """
    rng = _rng(seed)
    vol = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)  # a copy
    vol[vol < 1e-6] = 0.0  # no subnormals: power() on them is ~100x slower
    g = float(np.exp(rng.uniform(-gamma, gamma)))
    out = vol**g
    if bias > 0:
        out = out * (1.0 + bias * _smooth_scalar(vol.shape, rng))  # type: ignore[arg-type]
    if noise > 0:
        out = out + rng.normal(0.0, noise, size=vol.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def warp_labels(labels: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Nearest-neighbour ``labels(p + u(p))`` (0 outside), keeping the dtype.

    Args:
        labels: ``(X, Y, Z)`` integer label map.
        flow: ``(3, X, Y, Z)`` displacement in voxels, component c along axis c.

    Returns:
        ``(X, Y, Z)`` array of ``labels.dtype``.
    """
    if flow.shape != (3, *labels.shape):
        raise ValueError(f"warp_labels() 'flow' must have shape (3, {labels.shape}), got {flow.shape}")
    index = np.indices(labels.shape, dtype=np.float64) + flow
    nearest = np.floor(index + 0.5).astype(np.int64)  # round half up, as the CUDA/numba label warps do
    inside = np.ones(labels.shape, dtype=bool)
    for axis, n in enumerate(labels.shape):
        inside &= (nearest[axis] >= 0) & (nearest[axis] < n)
        np.clip(nearest[axis], 0, n - 1, out=nearest[axis])
    out = labels[nearest[0], nearest[1], nearest[2]]
    out[~inside] = 0
    return out


@dataclass
class SyntheticPair:
    """A synthetic pair on one grid (arrays in NIfTI (i, j, k) order).

    Attributes:
        fixed, moving: ``(X, Y, Z)`` float32 in [0, 1].
        flow: ``(3, X, Y, Z)`` float32 true displacement in voxels: fixed x <-> moving x + flow(x).
        fixed_labels, moving_labels: the source labels carried along (None without labels).
    """

    fixed: np.ndarray
    moving: np.ndarray
    flow: np.ndarray
    fixed_labels: Optional[np.ndarray] = None
    moving_labels: Optional[np.ndarray] = None


def make_pair(
    volume: np.ndarray,
    seed: Seed = None,
    *,
    labels: Optional[np.ndarray] = None,
    max_displacement: float = 4.0,
    base_displacement: Optional[float] = None,
    control_spacing: float = 16.0,
    intensity: bool = True,
) -> SyntheticPair:
    """Make a pair from ``volume`` with a known flow (see the module docstring).

    Args:
        volume: ``(X, Y, Z)`` float volume in [0, 1].
        seed: int, Generator (advanced in place) or None; the same seed gives the same pair.
        labels: optional ``(X, Y, Z)`` integer labels of ``volume``, warped by nearest neighbour.
        max_displacement: bound of the true flow in voxels (see :func:`random_flow`).
        base_displacement: bound of the base deformation of both images; default half of
            ``max_displacement``, 0 for none (``moving`` is then ``volume`` itself).
        control_spacing: B-spline control spacing in voxels.
        intensity: apply :func:`random_intensity` to each image.

    Returns:
        A :class:`SyntheticPair`; ``warp(moving, flow) ~= fixed`` (exact without intensity changes,
        up to trilinear interpolation).

    Raises:
        ValueError: ``volume`` is not 3-D, ``labels`` has another shape, or a bad bound.
    """
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"make_pair() 'volume' must be (X, Y, Z), got shape {vol.shape}")
    if labels is not None and labels.shape != vol.shape:
        raise ValueError(f"make_pair() 'labels' must have the volume's shape {vol.shape}, got {labels.shape}")
    rng = _rng(seed)
    shape = vol.shape
    base_bound = max_displacement / 2.0 if base_displacement is None else base_displacement
    flow = random_flow(shape, rng, max_displacement=max_displacement, control_spacing=control_spacing)
    if base_bound > 0:
        base = random_flow(shape, rng, max_displacement=base_bound, control_spacing=control_spacing)
        total = compose(base, flow)  # x -> x + u(x) -> ... + b(x + u(x)): u first, then b
        moving = warp(vol, base)
    else:
        base, total, moving = None, flow, vol.copy()
    fixed = warp(vol, total)
    moving_labels = fixed_labels = None
    if labels is not None:
        moving_labels = warp_labels(labels, base) if base is not None else labels.copy()
        fixed_labels = warp_labels(labels, total)
    if intensity:
        fixed = random_intensity(fixed, rng)
        moving = random_intensity(moving, rng)
    return SyntheticPair(fixed, moving, flow, fixed_labels, moving_labels)


def jacobian_determinant(flow: np.ndarray) -> np.ndarray:
    """``det(I + grad u)`` per voxel (central differences inside, one-sided at the border).

    Args:
        flow: ``(3, X, Y, Z)`` displacement in voxels.

    Returns:
        ``(X, Y, Z)`` float64; values <= 0 mark folding.
    """
    if flow.ndim != 4 or flow.shape[0] != 3:
        raise ValueError(f"jacobian_determinant() 'flow' must have shape (3, X, Y, Z), got {flow.shape}")
    grad = np.stack([np.stack(np.gradient(flow[c].astype(np.float64)), axis=0) for c in range(3)], axis=0)
    jac = grad + np.eye(3)[:, :, None, None, None]  # jac[c, a] = d(x_c + u_c) / d x_a
    return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))


def endpoint_error(
    flow: np.ndarray,
    true_flow: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    mask: Optional[np.ndarray] = None,
) -> dict[str, float]:
    """End-point error between two voxel flows on one (axis-aligned or rotated) grid.

    Physical error vectors are ``D diag(spacing) (flow - true_flow)``; D is orthonormal, so
    their length does not depend on it.

    Args:
        flow, true_flow: ``(3, X, Y, Z)`` displacements in voxels.
        spacing: mm per voxel along (i, j, k).
        mask: optional ``(X, Y, Z)`` bool; the statistics cover its voxels only.

    Returns:
        ``{"mm": mean, "mm_p95": 95th percentile, "voxels": mean}`` over the mask.

    Raises:
        ValueError: shapes differ, or the mask is empty or of another shape.
    """
    if flow.shape != true_flow.shape or flow.ndim != 4 or flow.shape[0] != 3:
        raise ValueError(f"endpoint_error() flows must both be (3, X, Y, Z), got {flow.shape}, {true_flow.shape}")
    diff = flow.astype(np.float64) - true_flow.astype(np.float64)
    scale = np.asarray(spacing, dtype=np.float64).reshape(3, 1, 1, 1)
    mm = np.sqrt(((diff * scale) ** 2).sum(axis=0))
    vox = np.sqrt((diff**2).sum(axis=0))
    if mask is not None:
        if mask.shape != flow.shape[1:] or not mask.any():
            raise ValueError(f"endpoint_error() 'mask' must be a non-empty {flow.shape[1:]} array")
        mm, vox = mm[mask], vox[mask]
    return {"mm": float(mm.mean()), "mm_p95": float(np.percentile(mm, 95)), "voxels": float(vox.mean())}
