"""RP-Net (SPEC sections 1 and 4) as PyTorch modules.

Tensors are ``(N, C, X, Y, Z)`` in NIfTI (i, j, k) order; see
:mod:`iirp.runtime.geometry`. Module and parameter names follow the released
checkpoint (``encoder.block{1..4}.main``, ``decoder{K}.Conv{...}``) so a
state dict loads with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from iirp.model.spatial import compose, upsample_flow, warp

__all__ = ["RPNet", "FeatureExtractor", "FlowEstimator", "level_channels"]

_SLOPE = 0.1
#: torch picks its im2col ``slow_conv3d`` over oneDNN for a batch-1 CPU input with
#: ``N * C * X * Y <= 20480`` (a heuristic in ATen's ConvUtils meant for 2-D), which makes the
#: small levels and small training crops 10-60x slower; see :class:`_Conv3d`.
_ATEN_NATIVE_CONV_LIMIT = 20480


def _tracing() -> bool:
    """Under an exporter or compiler, which must see the plain convolution."""
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
                or torch.compiler.is_exporting())


class _Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (3x3x3, stride 1, padding 1) that keeps batch-1 CPU inputs on oneDNN.

    Where ATen would fall back to ``slow_conv3d`` (see :data:`_ATEN_NATIVE_CONV_LIMIT`), the
    input is cut into two halves along X with a one-voxel halo and convolved as a batch of 2,
    which ATen sends to oneDNN; the halves are joined again. The result is the same convolution
    (float32 summation order aside). Parameter names (``weight``, ``bias``) are those of
    ``nn.Conv3d``, so released state dicts load unchanged; export traces the plain convolution.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _tracing() or not all(type(d) is int for d in x.shape):
            return super().forward(x)
        n, c, sx, sy = x.shape[:4]
        if (n != 1 or sx < 2 or x.device.type != "cpu" or x.dtype != torch.float32
                or n * c * sx * sy > _ATEN_NATIVE_CONV_LIMIT):
            return super().forward(x)
        half = (sx + 1) // 2
        padded = F.pad(x, (0, 0, 0, 0, 1, 1))
        pieces = torch.cat([padded[:, :, :half + 2], padded[:, :, sx - half:]])
        out = F.conv3d(pieces, self.weight, self.bias, 1, (0, 1, 1))
        return torch.cat([out[:1], out[1:, :, 2 * half - sx:]], dim=2)


def level_channels(first_channel: int = 8) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Feature channels and estimator widths ``q`` for levels 1..4 (SPEC 1).

    Returns:
        ``(features, q)``, each indexed by level - 1: with first_channel 8,
        features ``(8, 16, 32, 32)`` and q ``(16, 32, 32, 32)``.
    """
    c = first_channel
    return (c, 2 * c, 4 * c, 4 * c), (2 * c, 4 * c, 4 * c, 4 * c)


class _ConvBlock(nn.Module):
    """conv 3x3x3 (pad 1) + LeakyReLU(0.1)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.main = _Conv3d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.main(x), _SLOPE)


class _ResBlock(nn.Module):
    """LeakyReLU(conv 3x3x3 (x) + x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.main = _Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.main(x) + x, _SLOPE)


class FeatureExtractor(nn.Module):
    """Shared encoder E: image ``(N, 1, X, Y, Z)`` -> features F^1..F^4 (before pooling).

    F^k has ``features[k-1]`` channels at 1/2^(k-1) resolution.
    """

    def __init__(self, first_channel: int = 8, in_channel: int = 1) -> None:
        super().__init__()
        feats, _ = level_channels(first_channel)
        self.block1 = _ConvBlock(in_channel, feats[0])
        self.block2 = _ConvBlock(feats[0], feats[1])
        self.block3 = _ConvBlock(feats[1], feats[2])
        self.block4 = _ConvBlock(feats[2], feats[3])

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        f1 = self.block1(image)
        f2 = self.block2(F.avg_pool3d(f1, 2))
        f3 = self.block3(F.avg_pool3d(f2, 2))
        f4 = self.block4(F.avg_pool3d(f3, 2))
        return f1, f2, f3, f4


class FlowEstimator(nn.Module):
    """Residual flow estimator of one level.

    ``forward(warped_moving, fixed)``: two ``(N, C, x, y, z)`` feature maps ->
    ``(N, 3, x, y, z)`` float32 residual flow in voxels of this level.
    Layers: Conv1 (ConvBlock), Conv2..Conv{n+1} (ResBlocks), Conv{n+2} (q/2,
    linear), Conv{n+3} (3, linear).
    """

    def __init__(self, feature_channels: int, q: int, n_resblocks: int = 2) -> None:
        super().__init__()
        self.n_resblocks = n_resblocks
        self.Conv1 = _ConvBlock(2 * feature_channels, q)
        for k in range(2, n_resblocks + 2):
            setattr(self, f"Conv{k}", _ResBlock(q))
        setattr(self, f"Conv{n_resblocks + 2}", _Conv3d(q, q // 2, 3, padding=1))
        setattr(self, f"Conv{n_resblocks + 3}", _Conv3d(q // 2, 3, 3, padding=1))

    def forward(self, warped_moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        x = torch.cat([warped_moving, fixed], dim=1)
        for k in range(1, self.n_resblocks + 4):
            x = getattr(self, f"Conv{k}")(x)
        return x


class RPNet(nn.Module):
    """The recurrent-pyramid registration network.

    Attributes:
        encoder: the shared feature extractor.
        decoder1..decoder4: the flow estimator of each level (1 = finest).
        size: the model grid ``(X, Y, Z)`` the checkpoint was trained on.
    """

    def __init__(
        self,
        n_resblocks: int = 2,
        first_channel: int = 8,
        in_channel: int = 1,
        size: tuple[int, int, int] = (160, 192, 160),
    ) -> None:
        super().__init__()
        feats, q = level_channels(first_channel)
        self.size = tuple(int(s) for s in size)
        self.n_resblocks = n_resblocks
        self.first_channel = first_channel
        self.encoder = FeatureExtractor(first_channel, in_channel)
        for level in (1, 2, 3, 4):
            setattr(self, f"decoder{level}", FlowEstimator(feats[level - 1], q[level - 1], n_resblocks))

    def estimator(self, level: int) -> FlowEstimator:
        """The flow estimator f_level (level 1 = finest)."""
        return getattr(self, f"decoder{level}")

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """One RP-Net pass per level (SPEC 4).

        Args:
            moving, fixed: ``(N, 1, X, Y, Z)`` float32 in [0, 1], X, Y, Z multiples of 8.

        Returns:
            ``(N, 3, X, Y, Z)`` float32 flow phi1 in full-resolution voxels.
        """
        fm = self.encoder(moving)
        ff = self.encoder(fixed)
        phi = self.estimator(4)(fm[3], ff[3])
        for level in (3, 2, 1):
            phi = upsample_flow(phi, fm[level - 1].shape[2:])
            du = self.estimator(level)(warp(fm[level - 1], phi), ff[level - 1])
            phi = compose(phi, du)
        return phi
