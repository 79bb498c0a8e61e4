"""Spatial operations of SPEC section 3 in PyTorch: the numerical reference.

Conventions (see :mod:`iirp.runtime.geometry`): tensors ``(N, C, X, Y, Z)``;
flows ``(N, 3, X, Y, Z)`` float32 displacements in voxels of their own grid,
component c along tensor axis 2 + c. Every sampler here uses
``align_corners=True`` (voxel centres at integer indices) and zero padding.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

__all__ = ["warp", "upsample_flow", "compose", "ncc", "identity_coords"]


def identity_coords(shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Voxel index coordinates ``(1, 3, X, Y, Z)``: channel c holds the index along axis c."""
    axes = [torch.arange(int(n), device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)[None]


def warp(src: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """``warp(src, u)(p) = src(p + u(p))``: trilinear (or nearest), align_corners=True, zeros outside.

    Args:
        src: ``(N, C, X, Y, Z)`` tensor to sample.
        flow: ``(N, 3, X, Y, Z)`` displacement in voxels of src's grid.
        mode: ``"bilinear"`` (trilinear in 3D) or ``"nearest"``.

    Returns:
        ``(N, C, X, Y, Z)``, same dtype as src.

    Raises:
        ValueError: shapes disagree or an axis has fewer than 2 voxels.
    """
    if src.dim() != 5 or flow.dim() != 5 or flow.shape[1] != 3 or flow.shape[2:] != src.shape[2:] \
            or flow.shape[0] != src.shape[0]:
        raise ValueError(
            f"warp() 'flow' must have shape ({src.shape[0]}, 3, {', '.join(map(str, src.shape[2:]))}) "
            f"to match 'src' {tuple(src.shape)}, got {tuple(flow.shape)}"
        )
    sizes = src.shape[2:]
    if min(sizes) < 2:
        raise ValueError(f"warp() 'src' needs at least 2 voxels per axis, got {tuple(sizes)}")
    coords = identity_coords(sizes, flow.device, flow.dtype) + flow
    scale = torch.tensor([2.0 / (n - 1) for n in sizes], device=flow.device, dtype=flow.dtype)
    normalized = coords * scale.view(1, 3, 1, 1, 1) - 1.0
    # grid_sample wants (N, X, Y, Z, 3) with the last dim ordered (Z, Y, X).
    grid = normalized.permute(0, 2, 3, 4, 1).flip(-1)
    return F.grid_sample(src, grid.to(src.dtype), mode=mode, padding_mode="zeros", align_corners=True)


def upsample_flow(flow: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``up_s(u) = s * trilinear_resize(u, size, align_corners=True)``.

    Args:
        flow: ``(N, 3, x, y, z)`` displacement in voxels of the coarse grid.
        size: target ``(X, Y, Z)``; each must be the same integer multiple s of x, y, z.

    Returns:
        ``(N, 3, X, Y, Z)`` displacement in voxels of the fine grid.
    """
    ratios = {int(t) / int(s) for t, s in zip(size, flow.shape[2:])}
    if len(size) != 3 or flow.dim() != 5 or len(ratios) != 1 or int(next(iter(ratios))) != next(iter(ratios)):
        raise ValueError(
            f"upsample_flow() 'size' must be one integer multiple of {tuple(flow.shape[2:])}, got {tuple(size)}"
        )
    factor = next(iter(ratios))
    resized = F.interpolate(flow, size=tuple(int(s) for s in size), mode="trilinear", align_corners=True)
    return resized * factor  # a voxel-unit flow is rescaled with its grid


def compose(phi: torch.Tensor, du: torch.Tensor) -> torch.Tensor:
    """``compose(phi, du) = warp(phi, du) + du``: apply du first, then phi."""
    return warp(phi, du) + du


def ncc(a: torch.Tensor, b: torch.Tensor) -> float:
    """Global NCC of SPEC 3: ``mean((a-ma)(b-mb)) / (std_a std_b)``, unbiased std, float64 sums."""
    a64 = a.reshape(-1).double()
    b64 = b.reshape(-1).double()
    da = a64 - a64.mean()
    db = b64 - b64.mean()
    denom = float(a64.std(unbiased=True) * b64.std(unbiased=True))
    if denom == 0.0:
        return 0.0  # a constant image correlates with nothing
    return float((da * db).mean()) / denom
