"""Run :mod:`iirp.kernels.cuda_ops` unchanged on host-compiled kernels: a stand-in for its device layer.

cuda_ops validates its arrays through ``__cuda_array_interface__``, computes
the grid with ``cuda_build.ceil_div`` and launches through ``cuda_build``
(``get_kernels``, ``launch``, ``as_stream``, ``device_scratch``,
``buffer_pointer``, ``free_buffer``, ``pinned_buffer``, ``copy_to_host``). :class:`HostDevice`
replaces exactly those ``cuda_build`` functions (with pytest's monkeypatch) by
host equivalents, so every public cuda_ops function runs its own checks,
launch configuration and argument list against the kernels of
:mod:`cudahost.build`. :class:`HostArray` gives a numpy array the interface
(its "device" address is the host address).

Buffers from :func:`guarded_empty` / :func:`guarded_copy` end exactly at a
``PROT_NONE`` page, so a kernel that reads or writes past the end of an array
faults at once (the test process dies with a segfault trace) instead of
reading neighbouring memory.

Test-only: the package never imports this module.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from cudahost.build import HostLibrary
from iirp.kernels import cuda_build

__all__ = ["HostArray", "HostDevice", "Launch", "guarded_empty", "guarded_copy"]

_PAGE = mmap.PAGESIZE
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_PROT_NONE = 0


def guarded_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array whose last byte is followed by an inaccessible page.

    Filled with the byte 0xA5 (a float32 of 0xA5A5A5A5 is about -2.9e-16, so an output
    element a kernel forgets to write shows up in a bit comparison).
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    data_pages = -(-nbytes // _PAGE)
    region = mmap.mmap(-1, (data_pages + 1) * _PAGE)
    raw = np.frombuffer(region, np.uint8)
    guard = raw.ctypes.data + data_pages * _PAGE
    if _LIBC.mprotect(guard, _PAGE, _PROT_NONE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect of the guard page failed")
    raw[: data_pages * _PAGE] = 0xA5
    start = data_pages * _PAGE - nbytes  # a multiple of the item size: nbytes and the page are
    return raw[start: start + nbytes].view(dtype).reshape(shape)


def guarded_copy(array: np.ndarray) -> np.ndarray:
    """A copy of ``array`` in a :func:`guarded_empty` buffer (same dtype and shape, C-contiguous)."""
    out = guarded_empty(array.shape, array.dtype)
    out[...] = array
    return out


class HostArray:
    """A C-contiguous numpy array behind ``__cuda_array_interface__`` (version 3), for cuda_ops.

    The address it reports is the host address of the array: only kernels of
    :class:`HostDevice` may use it. cuda_ops cannot allocate for it, so pass ``out``.
    """

    def __init__(self, array: np.ndarray, *, readonly: bool = False) -> None:
        if not array.flags.c_contiguous:
            raise ValueError("HostArray needs a C-contiguous array")
        self.array = array
        self.readonly = readonly

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {
            "shape": tuple(self.array.shape),
            "typestr": self.array.dtype.str,
            "data": (int(self.array.ctypes.data), self.readonly),
            "version": 3,
            "strides": None,
        }


@dataclass(frozen=True)
class Launch:
    """One recorded launch: kernel name expression, grid, block and the arguments as passed."""

    expression: str
    grid: int
    block: int
    args: tuple[Any, ...]


@dataclass
class HostDevice:
    """The host stand-in for cuda_ops' device layer; :meth:`install` patches ``cuda_build``.

    Attributes:
        libraries: source name -> :class:`HostLibrary` (every source cuda_ops uses).
        launches: every launch since :meth:`install`, in order.
        scratch: every buffer handed out by ``device_scratch``, kept after ``free_buffer``
            so a test can read e.g. the score's per-block partials.
    """

    libraries: dict[str, HostLibrary]
    launches: list[Launch] = field(default_factory=list)
    scratch: list[np.ndarray] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Route ``cuda_build``'s device functions to the host (undone by monkeypatch at teardown)."""
        stream = object()

        def get_kernels(name: str, device_id: int) -> dict[str, Any]:
            assert device_id == 0, device_id
            return {expr: (expr, kernel) for expr, kernel in self.libraries[name].kernels.items()}

        def launch(kernel: Any, grid: int, block: int, run: Any, *args: Any) -> None:
            assert run is stream, "cuda_ops must launch on the stream it resolved"
            expression, host_kernel = kernel
            self.launches.append(Launch(expression, int(grid), int(block), args))
            host_kernel(grid, block, *args)

        def device_scratch(nbytes: int, device_id: int, run: Any) -> np.ndarray:
            buffer = guarded_empty((int(nbytes),), np.uint8)
            self.scratch.append(buffer)
            return buffer

        def copy_to_host(pointer: int, host: np.ndarray, run: Any, pinned: Any = None) -> None:
            assert host.flags.c_contiguous and host.flags.writeable
            assert pinned is None or pinned.nbytes >= host.nbytes
            ctypes.memmove(host.ctypes.data, int(pointer), host.nbytes)

        monkeypatch.setattr(cuda_build, "get_kernels", get_kernels)
        monkeypatch.setattr(cuda_build, "launch", launch)
        monkeypatch.setattr(cuda_build, "as_stream", lambda handle: stream)
        monkeypatch.setattr(cuda_build, "device_scratch", device_scratch)
        monkeypatch.setattr(cuda_build, "buffer_pointer", lambda buffer: int(buffer.ctypes.data))
        monkeypatch.setattr(cuda_build, "free_buffer", lambda buffer, run: None)
        monkeypatch.setattr(cuda_build, "copy_to_host", copy_to_host)
        monkeypatch.setattr(cuda_build, "pinned_buffer", lambda nbytes: np.zeros(int(nbytes), np.uint8))
        from iirp.kernels import cuda_ops

        monkeypatch.setattr(cuda_ops, "_WORKSPACES", {})  # host buffers for this test only
