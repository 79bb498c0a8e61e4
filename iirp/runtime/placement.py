"""Where a registration's arrays live, and the kernel set that works on them there.

A solver is three parts (:class:`~iirp.runtime.pipeline.EngineSolver`): a stage backend
(:mod:`iirp.runtime.engines`: onnxruntime, OpenVINO, TensorRT, torch), a kernel set with the
same function names on either kind of array, and a placement:

* :class:`HostPlacement` (``cpu``): numpy arrays, the numba kernels (:mod:`iirp.kernels`).
* :class:`CudaPlacement` (``cuda:N``): CuPy arrays on device N, the CUDA kernels
  (:mod:`iirp.kernels.cuda_ops`), all work queued on one non-blocking stream of that device.

The placement owns the crossing between host and device: the two volumes go up once
(:meth:`Placement.upload`), the flow comes down once (:meth:`Placement.download`); the IterStop
score (a host float) is the only other synchronisation. Arrays follow :mod:`iirp.runtime.geometry`
(C-contiguous float32: volumes ``(X, Y, Z)``, features ``(C, x, y, z)``, flows ``(3, x, y, z)``).

Importing this module needs neither CuPy nor a GPU; building a :class:`CudaPlacement` needs both.
CuPy is the GPU array library (not torch, so ``--engine trt`` runs without torch): it has a
memory pool (no ``cudaMalloc`` per call after the first registration), DLPack and
``__cuda_array_interface__``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np

from iirp.devices import CPU, Device, parse_device
from iirp.kernels.cuda_build import CudaUnavailableError

__all__ = ["Placement", "HostPlacement", "CudaPlacement", "CudaKernels", "Clock", "HOST", "make_placement",
           "check_cuda_device", "array_pointer"]


class Clock(ABC):
    """Milliseconds per stage name, summed over a registration."""

    @abstractmethod
    def start(self) -> Any:
        """A token for :meth:`stop` (a time, or an event recorded on the stream)."""

    @abstractmethod
    def stop(self, name: str, token: Any) -> None:
        """Add the time since ``token`` to ``name``."""

    @abstractmethod
    def totals(self) -> dict[str, float]:
        """Milliseconds per stage name (may synchronize once, at the end)."""


class _WallClock(Clock):
    def __init__(self) -> None:
        self.ms: dict[str, float] = defaultdict(float)

    def start(self) -> float:
        return time.perf_counter()

    def stop(self, name: str, token: Any) -> None:
        self.ms[name] += (time.perf_counter() - token) * 1e3

    def totals(self) -> dict[str, float]:
        return dict(self.ms)


class Placement(ABC):
    """Where arrays live: the array library, the kernel set, the stream (see the module docstring).

    Attributes:
        device: the :class:`~iirp.devices.Device`.
        kernels: an object with :func:`~iirp.kernels.warp`, ``compose``, ``upsample2`` and
            ``fused_ncc_score`` for this placement's arrays (the last returns a host float).
    """

    device: Device
    kernels: Any

    @property
    def is_host(self) -> bool:
        return not self.device.is_cuda

    @property
    def stream_handle(self) -> int:
        """The ``cudaStream_t`` every stage and kernel runs on (0 on the host)."""
        return 0

    @abstractmethod
    def upload(self, host: np.ndarray) -> Any:
        """``host`` as a C-contiguous float32 array of this placement (the one upload of a volume)."""

    @abstractmethod
    def download(self, array: Any) -> np.ndarray:
        """``array`` as a host numpy array (the one download of the flow; synchronizes)."""

    @abstractmethod
    def empty(self, shape: Sequence[int], dtype: Any = np.float32) -> Any:
        """An uninitialised C-contiguous array of this placement."""

    @abstractmethod
    def zeros(self, shape: Sequence[int], dtype: Any = np.float32) -> Any:
        """A C-contiguous array of zeros of this placement."""

    @abstractmethod
    def copy(self, array: Any) -> Any:
        """A C-contiguous copy of ``array`` (same placement)."""

    @abstractmethod
    def stack(self, arrays: Sequence[Any]) -> Any:
        """``arrays`` stacked along a new first axis (C-contiguous)."""

    def clock(self) -> Clock:
        """A per-stage clock for one registration."""
        return _WallClock()

    @abstractmethod
    def synchronize(self) -> None:
        """Wait for the work queued on the stream (nothing to wait for on the host)."""


class HostPlacement(Placement):
    """numpy arrays and the numba kernels (:mod:`iirp.kernels`)."""

    def __init__(self) -> None:
        from iirp import kernels

        self.device = CPU
        self.kernels = kernels

    def upload(self, host: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(host, dtype=np.float32)

    def download(self, array: Any) -> np.ndarray:
        return np.asarray(array)

    def empty(self, shape: Sequence[int], dtype: Any = np.float32) -> np.ndarray:
        return np.empty(tuple(int(s) for s in shape), dtype=dtype)

    def zeros(self, shape: Sequence[int], dtype: Any = np.float32) -> np.ndarray:
        return np.zeros(tuple(int(s) for s in shape), dtype=dtype)

    def copy(self, array: Any) -> np.ndarray:
        return np.array(array, copy=True, order="C")

    def stack(self, arrays: Sequence[Any]) -> np.ndarray:
        return np.stack(arrays)

    def synchronize(self) -> None:
        return None


#: The host placement (stateless: one for the process).
HOST = HostPlacement()


class CudaKernels:
    """:mod:`iirp.kernels.cuda_ops` with every launch on one stream and every result allocated by the placement.

    The same names and signatures as :mod:`iirp.kernels` (the numba set), so the pipeline calls
    either without knowing which.

    Args:
        stream: what cuda_ops launches on (a CuPy stream, or a raw ``cudaStream_t``).
        empty: ``empty(shape, dtype)`` of the placement, for results without ``out``.
    """

    def __init__(self, stream: Any, empty: Callable[..., Any]) -> None:
        from iirp.kernels import cuda_ops

        self._ops = cuda_ops
        self.stream = stream
        self.empty = empty

    def warp(self, src: Any, flow: Any, *, out: Any = None) -> Any:
        out = self.empty(src.shape, src.dtype) if out is None else out
        return self._ops.warp(src, flow, out=out, stream=self.stream)

    def compose(self, phi: Any, du: Any, *, out: Any = None) -> Any:
        out = self.empty(phi.shape, phi.dtype) if out is None else out
        return self._ops.compose(phi, du, out=out, stream=self.stream)

    def upsample(self, flow: Any, factor: int, *, out: Any = None) -> Any:
        out = self.empty((3, *(factor * int(n) for n in flow.shape[1:]))) if out is None else out
        return self._ops.upsample(flow, factor, out=out, stream=self.stream)

    def upsample2(self, flow: Any, *, out: Any = None) -> Any:
        return self.upsample(flow, 2, out=out)

    def fused_ncc_score(self, moving: Any, fixed: Any, flow: Any, factor: int) -> float:
        return self._ops.fused_ncc_score(moving, fixed, flow, factor, stream=self.stream)  # synchronizes


class _EventClock(Clock):
    """Stage times from CUDA event pairs on the placement's stream, read once at the end."""

    def __init__(self, cupy: Any, stream: Any) -> None:
        self.cupy = cupy
        self.stream = stream
        self.pairs: list[tuple[str, Any, Any]] = []

    def start(self) -> Any:
        event = self.cupy.cuda.Event()
        event.record(self.stream)
        return event

    def stop(self, name: str, token: Any) -> None:
        end = self.cupy.cuda.Event()
        end.record(self.stream)
        self.pairs.append((name, token, end))

    def totals(self) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        if self.pairs:
            self.pairs[-1][2].synchronize()
        for name, start, end in self.pairs:
            totals[name] += float(self.cupy.cuda.get_elapsed_time(start, end))
        return dict(totals)


class CudaPlacement(Placement):
    """CuPy arrays on one CUDA device, the CUDA kernels, one non-blocking stream.

    Args:
        device: a CUDA :class:`~iirp.devices.Device`.

    Raises:
        CudaUnavailableError: CuPy is not installed, or the device is not there.
    """

    def __init__(self, device: Device) -> None:
        if not device.is_cuda:
            raise ValueError(f"CudaPlacement() 'device' must be a CUDA device, got {device}")
        cupy = check_cuda_device(device)
        self.device = device
        self.cupy = cupy
        with cupy.cuda.Device(device.index):
            self.stream = cupy.cuda.Stream(non_blocking=True)
        self.kernels = CudaKernels(self.stream, self.empty)

    @property
    def stream_handle(self) -> int:
        return int(self.stream.ptr)

    def _on(self, call: Callable[[], Any]) -> Any:
        with self.cupy.cuda.Device(self.device.index), self.stream:
            return call()

    def upload(self, host: np.ndarray) -> Any:
        staged = np.ascontiguousarray(host, dtype=np.float32)
        return self._on(lambda: self.cupy.asarray(staged))

    def download(self, array: Any) -> np.ndarray:
        host = self._on(lambda: self.cupy.asnumpy(array, stream=self.stream))
        self.stream.synchronize()
        return host

    def empty(self, shape: Sequence[int], dtype: Any = np.float32) -> Any:
        return self._on(lambda: self.cupy.empty(tuple(int(s) for s in shape), dtype=dtype))

    def zeros(self, shape: Sequence[int], dtype: Any = np.float32) -> Any:
        return self._on(lambda: self.cupy.zeros(tuple(int(s) for s in shape), dtype=dtype))

    def copy(self, array: Any) -> Any:
        return self._on(lambda: self.cupy.array(array, copy=True, order="C"))

    def stack(self, arrays: Sequence[Any]) -> Any:
        return self._on(lambda: self.cupy.stack(list(arrays)))

    def clock(self) -> Clock:
        return _EventClock(self.cupy, self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()


def check_cuda_device(device: Device) -> Any:
    """CuPy, after checking it is installed and sees ``device`` (cheap: no stream, no allocation).

    Raises:
        CudaUnavailableError: CuPy is not installed, there is no driver, or no such device.
    """
    try:
        import cupy
    except ImportError as err:
        raise CudaUnavailableError(
            f"device {device} needs CuPy (the GPU arrays): pip install 'iirp[gpu-cu12]' (or gpu-cu13)"
        ) from err
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as err:  # noqa: BLE001 - no driver, no device: CuPy raises its own runtime errors
        raise CudaUnavailableError(f"device {device} requested but CUDA sees no device ({err})") from err
    if device.index >= count:
        raise CudaUnavailableError(f"device {device} requested but CUDA sees {count} device(s)")
    return cupy


def make_placement(device: Any) -> Placement:
    """The placement of ``device`` (a string or :class:`~iirp.devices.Device`).

    Raises:
        DeviceError: a malformed device string.
        CudaUnavailableError: a CUDA device without CuPy or without the device.
    """
    dev = parse_device(device)
    return HOST if not dev.is_cuda else CudaPlacement(dev)


def array_pointer(array: Any) -> int:
    """Device (or host) address of an array with ``__cuda_array_interface__`` (CuPy, torch, numba)."""
    return int(array.__cuda_array_interface__["data"][0] or 0)
