"""A CUDA placement without a GPU: the pipeline's device code path on host memory (test-only).

:class:`HostCudaPlacement` claims to be ``cuda:0``; its arrays (:class:`DeviceArray`) are numpy
arrays that expose ``__cuda_array_interface__`` with their host address, and its kernel set is
:class:`iirp.runtime.placement.CudaKernels`, i.e. :mod:`iirp.kernels.cuda_ops` with its checks,
launch configuration and argument lists, running the host builds of the ``.cu`` kernels (install
:class:`cudahost.device.HostDevice` first). So ``EngineLevelOps`` and the device-array backends
(TensorRT against a fake module) run exactly as on a GPU, pointers and buffer reuse included.
Buffers end against an inaccessible page (:func:`cudahost.device.guarded_empty`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cudahost.device import guarded_empty
from iirp.devices import Device
from iirp.runtime.placement import Clock, CudaKernels, Placement, _WallClock

__all__ = ["DeviceArray", "HostCudaPlacement"]


class DeviceArray(np.ndarray):
    """A numpy array that presents itself as a CUDA array whose device address is its host address."""

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {
            "shape": tuple(self.shape),
            "typestr": self.dtype.str,
            "data": (int(self.ctypes.data), False),
            "version": 3,
            "strides": None if self.flags.c_contiguous else tuple(self.strides),
        }


class HostCudaPlacement(Placement):
    """``cuda:0`` on host memory (see the module docstring). Records every buffer it hands out."""

    def __init__(self) -> None:
        self.device = Device("cuda", 0)
        self.kernels = CudaKernels(0, self.empty)
        self.allocated: list[DeviceArray] = []

    def _device(self, array: np.ndarray) -> DeviceArray:
        out = guarded_empty(array.shape, array.dtype).view(DeviceArray)
        out[...] = array
        return out

    def upload(self, host: np.ndarray) -> DeviceArray:
        return self._device(np.ascontiguousarray(host, dtype=np.float32))

    def download(self, array: Any) -> np.ndarray:
        return np.array(np.asarray(array), copy=True)

    def empty(self, shape: Sequence[int], dtype: Any = np.float32) -> DeviceArray:
        out = guarded_empty(tuple(int(s) for s in shape), dtype).view(DeviceArray)
        self.allocated.append(out)
        return out

    def zeros(self, shape: Sequence[int], dtype: Any = np.float32) -> DeviceArray:
        out = self.empty(shape, dtype)
        out[...] = 0
        return out

    def copy(self, array: Any) -> DeviceArray:
        return self._device(np.asarray(array))

    def stack(self, arrays: Sequence[Any]) -> DeviceArray:
        return self._device(np.stack([np.asarray(a) for a in arrays]))

    def clock(self) -> Clock:
        return _WallClock()

    def synchronize(self) -> None:
        return None
