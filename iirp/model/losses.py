"""Unsupervised training losses of RP-Net (SPEC section 6): local NCC and diffusion.

Conventions (see :mod:`iirp.runtime.geometry`): images ``(N, 1, X, Y, Z)``,
flows ``(N, 3, X, Y, Z)`` float32 displacements in voxels, component c along
tensor axis 2 + c. Both losses are differentiable and deterministic on the CPU.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["local_ncc", "diffusion", "DEFAULT_WINDOW", "NCC_EPS"]

#: Side of the cubic NCC window in voxels (the paper's 9^3).
DEFAULT_WINDOW = 9
#: Added to the product of the windowed variance sums (VoxelMorph's value).
NCC_EPS = 1e-5


def local_ncc(a: torch.Tensor, b: torch.Tensor, window: int = DEFAULT_WINDOW) -> torch.Tensor:
    """Mean local squared NCC of two images (VoxelMorph's ``NCC``), a similarity in [0, 1].

    For each voxel, over the ``window^3`` box around it (zero padding at the border):
    ``cc = cross^2 / (var_a * var_b + eps)`` with ``cross``, ``var_*`` the windowed sums
    of centred products; the result is the mean of ``cc`` over all voxels. The training loss
    uses ``-local_ncc``.

    Args:
        a, b: ``(N, 1, X, Y, Z)`` float32 images (same shape, any device).
        window: odd box side in voxels.

    Returns:
        0-dim float32 tensor (differentiable).

    Raises:
        ValueError: shapes differ, are not 5-D single-channel, or ``window`` is not a positive odd int.
    """
    if a.dim() != 5 or a.shape != b.shape or a.shape[1] != 1:
        raise ValueError(f"local_ncc() 'a' and 'b' must both be (N, 1, X, Y, Z), got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"local_ncc() 'window' must be a positive odd integer, got {window}")
    n = float(window**3)
    pad = window // 2

    def box_sum(x: torch.Tensor) -> torch.Tensor:
        # zeros outside, then a separable box average; times the box volume = the window sum
        x = F.pad(x, (pad,) * 6)
        for kernel in ((window, 1, 1), (1, window, 1), (1, 1, window)):
            x = F.avg_pool3d(x, kernel, stride=1)
        return x * n

    sa, sb = box_sum(a), box_sum(b)
    saa, sbb, sab = box_sum(a * a), box_sum(b * b), box_sum(a * b)
    cross = sab - sa * sb / n
    var_a = saa - sa * sa / n
    var_b = sbb - sb * sb / n
    return (cross * cross / (var_a * var_b + NCC_EPS)).mean()


def diffusion(flow: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser: mean squared forward differences of the flow, averaged over the 3 axes.

    ``(mean((u[x+1]-u[x])^2) + mean((u[y+1]-u[y])^2) + mean((u[z+1]-u[z])^2)) / 3``, each
    mean over batch, components and the voxels where the difference exists (VoxelMorph ``Grad('l2')``).

    Args:
        flow: ``(N, 3, X, Y, Z)`` float32 displacement in voxels.

    Returns:
        0-dim float32 tensor in voxels^2 (differentiable).

    Raises:
        ValueError: ``flow`` is not ``(N, 3, X, Y, Z)``.
    """
    if flow.dim() != 5 or flow.shape[1] != 3:
        raise ValueError(f"diffusion() 'flow' must have shape (N, 3, X, Y, Z), got {tuple(flow.shape)}")
    dx = flow[:, :, 1:, :, :] - flow[:, :, :-1, :, :]
    dy = flow[:, :, :, 1:, :] - flow[:, :, :, :-1, :]
    dz = flow[:, :, :, :, 1:] - flow[:, :, :, :, :-1]
    return ((dx * dx).mean() + (dy * dy).mean() + (dz * dz).mean()) / 3.0
