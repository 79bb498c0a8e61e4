"""The IterStop pipeline on one CUDA device: cuDNN stages + the CUDA kernels, one stream.

The GPU counterpart of :mod:`iirp.runtime.pipeline`. The stopping rules come
from :func:`iirp.iterstop.run_iterstop`; the network stages run as PyTorch
modules on CUDA (:class:`TorchStages`: cuDNN, channels-last 3D, fp32 or fp16)
and everything between them runs in :mod:`iirp.kernels.cuda_ops` on the same
torch tensors (zero copy, through ``__cuda_array_interface__``).

Data flow: the two volumes are uploaded once; features, flows and warped
features stay on the device; the only host synchronisation inside a level is
the score IterStop reads (:func:`iirp.kernels.cuda_ops.fused_ncc_score`); the
final flow is downloaded once. All work is queued on torch's current stream
of the solver's device (``stream=None`` in every kernel call).

Not implemented: capturing one estimator pass (warp + estimator + compose) in a
CUDA graph and replaying it; each pass is launched eagerly.

Tensors (see :mod:`iirp.runtime.geometry` for the conventions): volumes
``(X, Y, Z)`` float32; feature maps ``(C, x, y, z)`` in the stage precision
(float32 or float16), C-contiguous; flows ``(3, x, y, z)`` float32
displacements in voxels of their level, C-contiguous, always float32 (fp16
stages cast their output flow at the stage boundary).

Importing this module needs neither torch nor SimpleITK; building a
:class:`TorchStages` or :class:`CudaSolver` needs torch (and a CUDA device for
``cuda``), running the kernels needs ``cuda.core``.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import numpy as np

from iirp.errors import IirpError
from iirp.iterstop import IterStopRule, IterStopTrace, run_iterstop
from iirp.kernels.cuda_build import CudaUnavailableError
from iirp.manifest import estimator_stage
from iirp.typing import PathLike

__all__ = ["PRECISIONS", "TorchStages", "CudaLevelOps", "register_tensors_cuda", "CudaSolver"]

#: Stage precisions: network weights and activations; flows stay float32 either way.
PRECISIONS = ("fp32", "fp16")


def _import_torch(func: str) -> Any:
    try:
        import torch
    except ImportError as err:
        raise IirpError(f"{func}: the CUDA pipeline needs PyTorch with CUDA: pip install torch") from err
    return torch


def cuda_device(func: str, device: str) -> Any:
    """The ``torch.device`` for ``device`` (``cuda`` or ``cuda:N``), checked to exist.

    Raises:
        ValueError: ``device`` is not ``cuda[:N]``.
        CudaUnavailableError: torch is missing, sees no CUDA device, or has no device N.
    """
    if not isinstance(device, str) or not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"{func} 'device' must be 'cuda' or 'cuda:N', got {device!r}")
    try:
        import torch
    except ImportError as err:
        raise CudaUnavailableError(f"{func} 'device' {device!r} needs PyTorch with CUDA: pip install torch") from err
    if not torch.cuda.is_available():
        raise CudaUnavailableError(f"{func} 'device' {device!r} requested but torch sees no CUDA device")
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise CudaUnavailableError(
            f"{func} 'device' {device!r}: torch sees {torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device("cuda", index)


def _check_precision(func: str, precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"{func} 'precision' must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


class TorchStages:
    """The five RP-Net stages as PyTorch modules on one device (the cuDNN engine on CUDA).

    Weights and activations are in ``precision`` with channels-last 3D memory;
    inputs are cast to it and output flows cast back to float32 at the stage
    boundary. fp32 stages run with TF32 disabled (true fp32 convolutions).

    Args:
        checkpoint: an RP-Net checkpoint (:func:`iirp.model.load_checkpoint`).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32`` or ``fp16`` (fp16 needs a CUDA device).
        size: model grid ``(X, Y, Z)``; default the checkpoint's.

    Raises:
        ValueError: unknown precision, or fp16 on the CPU.
        CheckpointError: the checkpoint cannot be loaded.
        CudaUnavailableError: torch or the CUDA device is missing.
    """

    def __init__(
        self, checkpoint: PathLike, device: str = "cuda", precision: str = "fp32",
        size: Optional[tuple[int, int, int]] = None,
    ) -> None:
        func = "TorchStages()"
        _check_precision(func, precision)
        torch = _import_torch(func)
        dev = torch.device("cpu") if device == "cpu" else cuda_device(func, device)
        if precision == "fp16" and dev.type != "cuda":
            raise ValueError(f"{func} 'precision' fp16 needs a CUDA device, got device {device!r}")
        from iirp.model import load_checkpoint

        net, self.info = load_checkpoint(checkpoint, size=size)
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.format = torch.channels_last_3d
        self.net = net.to(dev, dtype=self.dtype).to(memory_format=self.format).eval()  # type: ignore[call-overload]
        self.device = dev
        self.precision = precision
        self.torch = torch

    @contextmanager
    def _flags(self) -> Iterator[None]:
        """cuDNN without TF32 for one stage call (fp32 means fp32); the previous setting is restored."""
        cudnn = self.torch.backends.cudnn
        previous = cudnn.allow_tf32
        cudnn.allow_tf32 = False
        try:
            yield
        finally:
            cudnn.allow_tf32 = previous

    def features(self, images: Any) -> list[Any]:
        """Feature pyramid of a batch of images.

        Args:
            images: ``(N, 1, X, Y, Z)`` float32 tensor on the stages' device, any layout.

        Returns:
            Four ``(N, C_k, X/2^(k-1), ...)`` tensors (levels 1..4) in the stage dtype, channels-last 3D.
            Queued on torch's current stream; not synchronized.
        """
        x = images.to(dtype=self.dtype, memory_format=self.format)
        with self.torch.inference_mode(), self._flags():
            return list(self.net.encoder(x))

    def estimate(self, level: int, moving: Any, fixed: Any) -> Any:
        """Residual flow ``f_level(moving, fixed)``.

        Args:
            level: 1 (finest) .. 4.
            moving, fixed: ``(1, C, x, y, z)`` tensors of the level in the stage dtype, any layout.

        Returns:
            ``(3, x, y, z)`` float32 C-contiguous tensor, displacement in voxels of the level.
            Queued on torch's current stream; not synchronized.
        """
        fmt = self.format
        with self.torch.inference_mode(), self._flags():
            du = self.net.estimator(level)(moving.contiguous(memory_format=fmt), fixed.contiguous(memory_format=fmt))
        return du[0].float().contiguous()

    def engine_stages(self) -> dict[str, "_HostStage"]:
        """These modules as :class:`~iirp.runtime.engines.Backend`-like host stages (numpy in, numpy out).

        For :func:`iirp.runtime.pipeline.register_arrays_with_engines`, i.e. the CPU
        pipeline (numba kernels) over the same weights, without an export folder.
        """
        names = {"feature_extractor": None, **{estimator_stage(level): level for level in (1, 2, 3, 4)}}
        return {name: _HostStage(self, level) for name, level in names.items()}


class _HostStage:
    """One stage of :class:`TorchStages` with the engine ``infer`` contract on float32 host arrays."""

    def __init__(self, stages: TorchStages, level: Optional[int]) -> None:
        self.stages = stages
        self.level = level

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, dev = self.stages.torch, self.stages.device
        if self.level is None:
            feats = self.stages.features(torch.from_numpy(feeds["image"]).to(dev))
            return {f"f{k}": f.float().cpu().contiguous().numpy() for k, f in zip((1, 2, 3, 4), feats)}
        moving = torch.from_numpy(feeds["moving_features"]).to(dev, dtype=self.stages.dtype)
        fixed = torch.from_numpy(feeds["fixed_features"]).to(dev, dtype=self.stages.dtype)
        return {"flow": self.stages.estimate(self.level, moving, fixed)[None].cpu().numpy()}


class _EventClock:
    """Per-stage GPU time from CUDA event pairs on the current stream, read once at the end (ms)."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self.pairs: list[tuple[str, Any, Any]] = []

    def start(self) -> Any:
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, name: str, start: Any) -> None:
        end = self.torch.cuda.Event(enable_timing=True)
        end.record()
        self.pairs.append((name, start, end))

    def totals(self) -> dict[str, float]:
        """Summed milliseconds per stage name; synchronizes on the last event."""
        totals: dict[str, float] = defaultdict(float)
        if self.pairs:
            self.pairs[-1][2].synchronize()
        for name, start, end in self.pairs:
            totals[name] += float(start.elapsed_time(end))
        return dict(totals)


class CudaLevelOps:
    """:class:`iirp.iterstop.LevelOps` on CUDA tensors: :class:`TorchStages` + :mod:`iirp.kernels.cuda_ops`.

    Flows are ``(3, x, y, z)`` float32 C-contiguous CUDA tensors (voxels of their level).

    Args:
        stages: CUDA :class:`TorchStages`.
        moving, fixed: ``(X, Y, Z)`` float32 C-contiguous CUDA tensors in [0, 1] on the stages' device.
        clock: optional per-stage event timer (stages ``features``, ``estimator_K``, ``kernels``, ``score``).

    Every call queues work on torch's current stream and returns without
    synchronizing, except :meth:`score` (returns a host float).
    """

    def __init__(self, stages: TorchStages, moving: Any, fixed: Any, clock: Optional[_EventClock] = None) -> None:
        from iirp.kernels import cuda_ops

        self.ops = cuda_ops
        self.stages = stages
        self.moving = moving
        self.fixed = fixed
        self.clock = clock
        t0 = self._start()
        feats = stages.features(stages.torch.stack([fixed, moving])[:, None])  # (2, 1, X, Y, Z): fixed, moving
        self.fixed_features = [f[0:1] for f in feats]  # channels-last, as the estimators want them
        self.moving_features = [f[1].contiguous() for f in feats]  # C-contiguous (C, x, y, z) for the warp kernel
        self._stop("features", t0)

    def _start(self) -> Any:
        return self.clock.start() if self.clock is not None else None

    def _stop(self, name: str, start: Any) -> None:
        if self.clock is not None:
            self.clock.stop(name, start)

    def zero_flow(self, level: int) -> Any:
        shape = self.moving_features[level - 1].shape[1:]
        return self.stages.torch.zeros((3, *shape), dtype=self.stages.torch.float32, device=self.moving.device)

    def estimate(self, level: int, flow: Optional[Any]) -> Any:
        moving = self.moving_features[level - 1]
        if flow is not None:
            t0 = self._start()
            moving = self.ops.warp(moving, flow)  # fp16 features are blended in fp32, stored fp16
            self._stop("kernels", t0)
        t0 = self._start()
        du = self.stages.estimate(level, moving[None], self.fixed_features[level - 1])
        self._stop(f"estimator_{level}", t0)
        return du

    def compose(self, flow: Optional[Any], du: Any) -> Any:
        if flow is None:
            return du
        t0 = self._start()
        out = self.ops.compose(flow, du)
        self._stop("kernels", t0)
        return out

    def upsample(self, flow: Any, level: int) -> Any:
        t0 = self._start()
        out = self.ops.upsample2(flow)  # vectors doubled with the grid
        self._stop("kernels", t0)
        return out

    def score(self, level: int, flow: Any) -> float:
        t0 = self._start()
        value = self.ops.fused_ncc_score(self.moving, self.fixed, flow, 2 ** (level - 1))  # synchronizes
        self._stop("score", t0)
        return value


def register_tensors_cuda(
    stages: TorchStages, moving: Any, fixed: Any, rule: IterStopRule, *, timings: bool = True
) -> IterStopTrace[Any]:
    """Run IIRP on device volumes; the trace's flow stays on the device.

    Args:
        stages: CUDA :class:`TorchStages`.
        moving, fixed: ``(X, Y, Z)`` float32 C-contiguous CUDA tensors in [0, 1] on the stages' device.
        rule: the IterStop rule.
        timings: record per-stage CUDA event times into ``trace.timings_ms`` (plus ``iirp``, the total).

    Returns:
        The trace; ``flow`` is a ``(3, X, Y, Z)`` float32 CUDA tensor, voxels. Work is queued on
        torch's current stream; with ``timings`` the stream is synchronized at the end.
    """
    torch = stages.torch
    clock = _EventClock(torch) if timings else None
    with torch.cuda.device(stages.device), torch.inference_mode():
        t0 = clock.start() if clock is not None else None
        trace = run_iterstop(CudaLevelOps(stages, moving, fixed, clock), rule)
        if clock is not None:
            clock.stop("iirp", t0)
            trace.timings_ms = clock.totals()
    return trace


class CudaSolver:
    """A :class:`~iirp.runtime.solvers.FlowSolver` running the whole IterStop loop on one CUDA device.

    Args:
        checkpoint: an RP-Net checkpoint.
        device: ``cuda`` or ``cuda:N``.
        precision: ``fp32`` or ``fp16`` network (flows stay float32).
        engine: the name reported (``torch``: the cuDNN engine).
        size: model grid ``(X, Y, Z)``; default the checkpoint's.

    Raises:
        ValueError: bad ``device`` or ``precision``.
        CudaUnavailableError: torch, cuda.core or the CUDA device is missing.
        CheckpointError: the checkpoint cannot be loaded.
    """

    def __init__(
        self, checkpoint: PathLike, device: str = "cuda", precision: str = "fp32", engine: str = "torch",
        size: Optional[tuple[int, int, int]] = None,
    ) -> None:
        cuda_device("CudaSolver()", device)  # fail before loading anything
        try:
            import cuda.core  # noqa: F401
        except ImportError as err:
            raise CudaUnavailableError(
                "CudaSolver() needs cuda.core for the CUDA kernels: pip install cuda-core"
            ) from err
        self.stages = TorchStages(checkpoint, device, precision, size=size)
        self.engine = engine
        self.device = str(self.stages.device)
        self.precision = precision
        self.model_size = self.stages.info.size
        self.source = os.fspath(self.stages.info.path)
        self.source_sha256 = self.stages.info.sha256

    def upload(self, volume: np.ndarray, name: str) -> Any:
        """``(X, Y, Z)`` host volume -> float32 C-contiguous tensor on the solver's device (current stream)."""
        if not isinstance(volume, np.ndarray) or volume.ndim != 3:
            raise ValueError(f"CudaSolver.solve() '{name}' must be an (X, Y, Z) numpy array, got "
                             f"{getattr(volume, 'shape', type(volume).__name__)}")
        host = np.ascontiguousarray(volume, dtype=np.float32)
        return self.stages.torch.from_numpy(host).to(self.stages.device)

    def solve(self, moving: np.ndarray, fixed: np.ndarray, rule: IterStopRule) -> IterStopTrace[np.ndarray]:
        """``(X, Y, Z)`` float32 volumes in [0, 1] -> trace with a ``(3, X, Y, Z)`` float32 numpy flow (voxels).

        Uploads both volumes once and downloads the flow once; ``timings_ms`` holds the
        per-stage GPU times (CUDA events) and ``upload`` / ``download`` / ``solve`` wall times.

        Raises:
            ValueError: shapes differ or are not multiples of 8 (>= 16).
        """
        if np.shape(moving) != np.shape(fixed) or any(s % 8 or s < 16 for s in np.shape(fixed)):
            raise ValueError(f"CudaSolver.solve() needs two equal (X, Y, Z) volumes with multiples of 8 (>= 16), "
                             f"got {np.shape(moving)} and {np.shape(fixed)}")
        t0 = time.perf_counter()
        m, f = self.upload(moving, "moving"), self.upload(fixed, "fixed")
        t1 = time.perf_counter()
        trace = register_tensors_cuda(self.stages, m, f, rule)
        t2 = time.perf_counter()
        flow = trace.flow.cpu().numpy()  # the one download (synchronizes the stream)
        t3 = time.perf_counter()
        timings = dict(trace.timings_ms)
        timings.update(upload=(t1 - t0) * 1e3, download=(t3 - t2) * 1e3, solve=(t3 - t0) * 1e3)
        return IterStopTrace(flow=flow, iterations=list(trace.iterations), estimator_passes=trace.estimator_passes,
                             scores=[list(s) for s in trace.scores], timings_ms=timings)
