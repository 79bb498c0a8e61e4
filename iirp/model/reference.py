"""The reference IIRP loop in PyTorch: the numerical ground truth for every engine.

Written for clarity, not speed: each score upsamples the flow to full
resolution, warps the moving image and computes NCC with separate calls, as
the released code does. The stopping rules come from :mod:`iirp.iterstop`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Optional

import numpy as np
import torch

from iirp.iterstop import IterStopRule, IterStopTrace, run_iterstop
from iirp.model.rpnet import RPNet
from iirp.model.spatial import compose, ncc, upsample_flow, warp

__all__ = ["TorchLevelOps", "register_tensors", "register_arrays"]


class TorchLevelOps:
    """:class:`iirp.iterstop.LevelOps` over an :class:`RPNet` and one image pair.

    Args:
        net: the network (any device; eval mode).
        moving, fixed: ``(1, 1, X, Y, Z)`` float32 tensors on the net's device.
        timings_ms: optional dict accumulating wall time (ms) per stage: ``features``,
            ``estimator_K``, ``kernels`` (warp, compose, upsample) and ``score``. Host clock:
            on a CUDA device the times are launch times unless the caller synchronizes.

    Flows are ``(1, 3, x, y, z)`` float32 tensors of the level's grid.
    """

    def __init__(
        self, net: RPNet, moving: torch.Tensor, fixed: torch.Tensor, timings_ms: Optional[dict[str, float]] = None
    ) -> None:
        self.net = net
        self.moving = moving
        self.fixed = fixed
        self.timings_ms = timings_ms if timings_ms is not None else defaultdict(float)
        t0 = time.perf_counter()
        feats = net.encoder(torch.cat([fixed, moving], dim=0))  # one batch of 2: fixed, moving
        self.fixed_features = [f[0:1] for f in feats]
        self.moving_features = [f[1:2] for f in feats]
        self._add("features", t0)

    def _add(self, stage: str, start: float) -> None:
        self.timings_ms[stage] = self.timings_ms.get(stage, 0.0) + (time.perf_counter() - start) * 1e3

    def _shape(self, level: int) -> tuple[int, ...]:
        return tuple(self.moving_features[level - 1].shape[2:])

    def zero_flow(self, level: int) -> torch.Tensor:
        return self.moving.new_zeros((1, 3, *self._shape(level)))

    def estimate(self, level: int, flow: Optional[torch.Tensor]) -> torch.Tensor:
        t0 = time.perf_counter()
        moving = self.moving_features[level - 1]
        warped = moving if flow is None else warp(moving, flow)
        self._add("kernels", t0)
        t0 = time.perf_counter()
        du = self.net.estimator(level)(warped, self.fixed_features[level - 1])
        self._add(f"estimator_{level}", t0)
        return du

    def compose(self, flow: Optional[torch.Tensor], du: torch.Tensor) -> torch.Tensor:
        if flow is None:
            return du
        t0 = time.perf_counter()
        out = compose(flow, du)
        self._add("kernels", t0)
        return out

    def upsample(self, flow: torch.Tensor, level: int) -> torch.Tensor:
        t0 = time.perf_counter()
        out = upsample_flow(flow, self._shape(level - 1))
        self._add("kernels", t0)
        return out

    def full_resolution(self, level: int, flow: torch.Tensor) -> torch.Tensor:
        """``up_{2^(level-1)}(flow)`` on the full-resolution grid."""
        return flow if level == 1 else upsample_flow(flow, self._shape(1))

    def score(self, level: int, flow: torch.Tensor) -> float:
        t0 = time.perf_counter()
        value = ncc(warp(self.moving, self.full_resolution(level, flow)), self.fixed)
        self._add("score", t0)
        return value


@torch.inference_mode()
def register_tensors(
    net: RPNet, moving: torch.Tensor, fixed: torch.Tensor, rule: IterStopRule
) -> IterStopTrace[torch.Tensor]:
    """Run IIRP on ``(1, 1, X, Y, Z)`` tensors; returns the trace with a tensor flow."""
    return run_iterstop(TorchLevelOps(net, moving, fixed), rule)


def register_arrays(
    net: RPNet, moving: np.ndarray, fixed: np.ndarray, rule: IterStopRule, device: str = "cpu"
) -> IterStopTrace[np.ndarray]:
    """Run IIRP on ``(X, Y, Z)`` float32 numpy volumes in [0, 1] (NIfTI i, j, k order).

    Returns:
        The trace with ``flow`` as a ``(3, X, Y, Z)`` float32 numpy array in voxels and
        ``timings_ms`` holding the per-stage times of :class:`TorchLevelOps` plus ``iirp``
        (the whole loop, features and the flow's copy to the host included).

    Raises:
        ValueError: shapes differ or are not multiples of 8 (>= 16).
    """
    if moving.shape != fixed.shape or moving.ndim != 3 or any(s % 8 or s < 16 for s in fixed.shape):
        raise ValueError(
            f"register_arrays() needs two equal (X, Y, Z) volumes with multiples of 8 (>= 16), "
            f"got {moving.shape} and {fixed.shape}"
        )
    dev = torch.device(device)
    # channels-last 3D lets oneDNN/cuDNN pick fast conv kernels (about 5x on CPU); same math.
    fmt = torch.channels_last_3d
    net = net.to(dev).to(memory_format=fmt)  # type: ignore[call-overload]
    m = torch.from_numpy(np.ascontiguousarray(moving, dtype=np.float32))[None, None].to(dev, memory_format=fmt)
    f = torch.from_numpy(np.ascontiguousarray(fixed, dtype=np.float32))[None, None].to(dev, memory_format=fmt)
    timings: dict[str, float] = {}
    with torch.inference_mode():
        t0 = time.perf_counter()
        ops = TorchLevelOps(net, m, f, timings)
        trace = run_iterstop(ops, rule)
        flow = trace.flow[0].float().cpu().numpy()
        timings["iirp"] = (time.perf_counter() - t0) * 1e3
    return IterStopTrace(
        flow=flow,
        iterations=list(trace.iterations),
        estimator_passes=trace.estimator_passes,
        scores=[list(s) for s in trace.scores],
        timings_ms=timings,
    )
