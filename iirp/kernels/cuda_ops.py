"""CUDA warp / compose / upsample / fused score / label warp on device arrays.

The GPU counterparts of :mod:`iirp.kernels.warp`, :mod:`iirp.kernels.upsample`
and :mod:`iirp.kernels.score` (same signatures plus ``stream``, same edge
handling, same float32 arithmetic: results equal the numba kernels bit for bit,
except the fused score, whose float64 sums are added in another fixed order).
Kernels are compiled at run time by :mod:`iirp.kernels.cuda_build`.

Conventions (SPEC section 3, :mod:`iirp.runtime.geometry`): batch-free,
C-contiguous arrays; volumes ``(X, Y, Z)``, feature maps ``(C, X, Y, Z)``, flows
``(3, X, Y, Z)`` float32 displacements in voxels of their own grid, component c
along array axis c; trilinear sampling with ``align_corners=True`` (voxel
centres at integer indices) and zero padding.

Device arrays: any object with ``__cuda_array_interface__`` (PyTorch CUDA
tensors, CuPy arrays, numba device arrays), C-contiguous, all on one device.
Nothing is converted: a wrong dtype or layout is an error. ``out=None``
allocates the result with the input's library (torch or CuPy only; other
arrays need ``out``); an ``out`` must not overlap the inputs.

Streams: every function launches on ``stream`` and returns without
synchronizing (except :func:`fused_ncc_score`, which returns a host float).
``stream`` may be a ``torch.cuda.Stream``, a CuPy stream, a ``cuda.core``
Stream, any object with ``__cuda_stream__()``, or a raw ``cudaStream_t`` int;
``None`` means the current stream of the input's library
(``torch.cuda.current_stream(device)``, CuPy's current stream), else the
legacy default stream. An ``out=None`` result is allocated by that library on
its current stream; when launching on another stream, pass ``out`` (or
``record_stream`` it) as usual with multi-stream PyTorch code.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from iirp.kernels import cuda_build
from iirp.kernels._checks import _shape_text, check_factor

__all__ = ["warp", "compose", "upsample", "upsample2", "fused_ncc_score", "warp_labels"]

#: Threads per block of the elementwise kernels (their ``__launch_bounds__``).
_BLOCK = 256
#: Threads per block of the score kernels: IIRP_SCORE_BLOCK in cuda/score.cu.
_SCORE_BLOCK = 256
#: Kernels index voxels with 32-bit ints.
_MAX_VOXELS = 2**31 - 1

_F32 = np.dtype(np.float32)
_F16 = np.dtype(np.float16)
#: Label dtypes of :func:`warp_labels` -> C type of the ``iirp_warp_nearest`` instantiation.
_LABEL_TYPES: dict[np.dtype, str] = {
    np.dtype(np.int32): "int",
    np.dtype(np.int16): "short",
    np.dtype(np.uint8): "unsigned char",
}


@dataclass(frozen=True)
class _Dev:
    """A validated device array: the object, its address, shape, dtype and device id (None if unknown)."""

    obj: Any
    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    readonly: bool
    device: Optional[int]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _library(obj: Any) -> str:
    return type(obj).__module__.split(".")[0]


def _device_of(obj: Any) -> Optional[int]:
    """CUDA device ordinal of a torch tensor or CuPy array; None when the object does not say."""
    device = getattr(obj, "device", None)
    if device is None:
        return None
    if _library(obj) == "torch":
        if device.index is not None:
            return int(device.index)
        import torch

        return int(torch.cuda.current_device())
    ident = getattr(device, "id", None)  # cupy.cuda.Device
    return int(ident) if ident is not None else None


def _is_c_contiguous(shape: tuple[int, ...], strides: Any, itemsize: int) -> bool:
    if strides is None:
        return True
    expected = itemsize
    for extent, stride in zip(reversed(shape), reversed(tuple(strides))):
        if extent > 1 and int(stride) != expected:
            return False
        expected *= extent
    return True


def _names(dtypes: tuple[np.dtype, ...]) -> str:
    return " or ".join(str(d) for d in dtypes)


def _view(func: str, name: str, value: Any, dtypes: tuple[np.dtype, ...]) -> _Dev:
    """Check that ``value`` is a C-contiguous CUDA array of one of ``dtypes``; its :class:`_Dev`.

    Raises:
        TypeError: no ``__cuda_array_interface__``, or a dtype outside ``dtypes``.
        ValueError: not C-contiguous, or masked.
    """
    try:
        cai = value.__cuda_array_interface__
    except Exception as err:  # noqa: BLE001 - AttributeError, or torch's error for tensors that require grad
        raise TypeError(
            f"{func}() '{name}' must be a CUDA device array with __cuda_array_interface__ "
            f"(a torch CUDA tensor without grad, a CuPy array), got {type(value).__name__}"
        ) from err
    shape = tuple(int(s) for s in cai["shape"])
    dtype = np.dtype(cai["typestr"])
    if dtype not in dtypes:
        raise TypeError(f"{func}() '{name}' must have dtype {_names(dtypes)}, got {dtype}")
    if not _is_c_contiguous(shape, cai.get("strides"), dtype.itemsize):
        raise ValueError(f"{func}() '{name}' must be C-contiguous, got strides {tuple(cai['strides'])}")
    if cai.get("mask") is not None:
        raise ValueError(f"{func}() '{name}' must not be a masked array")
    pointer, readonly = cai["data"]
    return _Dev(value, int(pointer or 0), shape, dtype, bool(readonly), _device_of(value))


def _check_shape(func: str, name: str, array: _Dev, expected: tuple[int, ...]) -> None:
    if array.shape != tuple(int(s) for s in expected):
        raise ValueError(f"{func}() '{name}' must have shape {_shape_text(expected)}, got {_shape_text(array.shape)}")


def _check_ndim(func: str, name: str, array: _Dev, allowed: str, ndims: tuple[int, ...]) -> None:
    if len(array.shape) not in ndims:
        raise ValueError(f"{func}() '{name}' must have shape {allowed}, got {_shape_text(array.shape)}")


def _check_voxels(func: str, name: str, shape: tuple[int, ...]) -> int:
    n = int(np.prod(shape, dtype=np.int64))
    if n > _MAX_VOXELS:
        raise ValueError(f"{func}() '{name}' has {n} voxels per channel, more than the kernels' limit {_MAX_VOXELS}")
    return n


def _device_id(func: str, arrays: dict[str, _Dev]) -> int:
    """The one device all ``arrays`` live on (device 0's context when none says)."""
    known = {name: a.device for name, a in arrays.items() if a.device is not None}
    if len(set(known.values())) > 1:
        where = ", ".join(f"'{name}' on cuda:{dev}" for name, dev in known.items())
        raise ValueError(f"{func}() arrays must be on one device, got {where}")
    return next(iter(known.values()), 0)


def _overlaps(a: _Dev, b: _Dev) -> bool:
    return a.nbytes > 0 and b.nbytes > 0 and a.ptr < b.ptr + b.nbytes and b.ptr < a.ptr + a.nbytes


def _empty(func: str, ref: _Dev, shape: tuple[int, ...], dtype: np.dtype, device_id: int) -> Any:
    """A new uninitialised array of the reference array's library (torch or CuPy) on ``device_id``."""
    library = _library(ref.obj)
    if library == "torch":
        import torch

        torch_dtype = {_F32: torch.float32, _F16: torch.float16, np.dtype(np.int32): torch.int32,
                       np.dtype(np.int16): torch.int16, np.dtype(np.uint8): torch.uint8}[dtype]
        return torch.empty(shape, dtype=torch_dtype, device=torch.device("cuda", device_id))
    if library == "cupy":
        import cupy

        with cupy.cuda.Device(device_id):
            return cupy.empty(shape, dtype=dtype)
    raise TypeError(
        f"{func}() 'out' is required for {type(ref.obj).__name__} inputs (only torch and CuPy can allocate)"
    )


def _out(func: str, out: Any, ref: _Dev, shape: tuple[int, ...], dtype: np.dtype, device_id: int,
         inputs: dict[str, _Dev]) -> _Dev:
    """The checked output array: ``out``, or a new one when it is None.

    Raises:
        TypeError: ``out`` is not a CUDA array of ``dtype`` (or cannot be allocated).
        ValueError: wrong shape, layout or device, read-only, or overlapping an input.
    """
    if out is None:
        return _view(func, "out", _empty(func, ref, shape, dtype, device_id), (dtype,))
    result = _view(func, "out", out, (dtype,))
    _check_shape(func, "out", result, shape)
    if result.readonly:
        raise ValueError(f"{func}() 'out' must be writeable")
    if result.device is not None and result.device != device_id:
        raise ValueError(f"{func}() 'out' must be on cuda:{device_id}, got cuda:{result.device}")
    for name, array in inputs.items():
        if _overlaps(result, array):
            raise ValueError(f"{func}() 'out' must not overlap '{name}'")
    return result


def _stream(func: str, stream: Any, ref: _Dev, device_id: int) -> Any:
    """The cuda.core Stream to launch on (see the module docstring)."""
    if stream is None:
        library = _library(ref.obj)
        if library == "torch":
            import torch

            stream = int(torch.cuda.current_stream(device_id).cuda_stream)
        elif library == "cupy":
            import cupy

            with cupy.cuda.Device(device_id):
                stream = int(cupy.cuda.get_current_stream().ptr)
        else:
            stream = 0
    elif isinstance(getattr(stream, "cuda_stream", None), int):  # torch.cuda.Stream, ExternalStream
        stream = int(stream.cuda_stream)
    elif not hasattr(stream, "__cuda_stream__") and isinstance(getattr(stream, "ptr", None), int):  # older CuPy
        stream = int(stream.ptr)
    try:
        return cuda_build.as_stream(stream)
    except TypeError as err:
        raise TypeError(
            f"{func}() 'stream' must be a torch/CuPy/cuda.core stream or an int handle, got {type(stream).__name__}"
        ) from err


def warp(src: Any, flow: Any, *, out: Any = None, stream: Any = None) -> Any:
    """``warp(src, u)(p) = src(p + u(p))`` on the GPU: trilinear, align_corners=True, zeros outside.

    Bit for bit :func:`iirp.kernels.warp.warp` on the same float32 values; with
    float16 storage the blend runs in float32 and is rounded once (to nearest
    even) on store. Also the full-resolution warp of an image (``(X, Y, Z)``).

    Args:
        src: ``(X, Y, Z)`` or ``(C, X, Y, Z)`` float32 or float16 CUDA array to sample.
        flow: ``(3, X, Y, Z)`` float32 CUDA array, displacement in voxels of src's
            grid, component c along array axis c.
        out: optional CUDA array of src's shape and dtype, written in place and
            returned; must not overlap ``src`` or ``flow``. None: allocated (see module doc).
        stream: stream to launch on (see module doc); not synchronized.

    Returns:
        ``out`` (or the new array): the warped volume, src's shape and dtype.

    Raises:
        TypeError: an argument is not a CUDA array of the stated dtype.
        ValueError: wrong shapes, layouts or devices, or ``out`` overlaps an input.
        CudaUnavailableError, KernelCompileError: see :mod:`iirp.kernels.cuda_build`.
    """
    s = _view("warp", "src", src, (_F32, _F16))
    f = _view("warp", "flow", flow, (_F32,))
    _check_ndim("warp", "src", s, "(X, Y, Z) or (C, X, Y, Z)", (3, 4))
    spatial = s.shape[-3:]
    _check_shape("warp", "flow", f, (3, *spatial))
    n = _check_voxels("warp", "src", spatial)
    device_id = _device_id("warp", {"src": s, "flow": f})
    o = _out("warp", out, s, s.shape, s.dtype, device_id, {"src": s, "flow": f})
    channels = 1 if len(s.shape) == 3 else s.shape[0]
    if n and channels:
        run = _stream("warp", stream, s, device_id)
        expr = "iirp_warp<float>" if s.dtype == _F32 else "iirp_warp<iirp_half>"
        kernel = cuda_build.get_kernels("warp.cu", device_id)[expr]
        cuda_build.launch(kernel, cuda_build.ceil_div(n, _BLOCK), _BLOCK, run, s.ptr, f.ptr, o.ptr,
                          np.int32(channels), *(np.int32(d) for d in spatial))
    return o.obj


def compose(phi: Any, du: Any, *, out: Any = None, stream: Any = None) -> Any:
    """``compose(phi, du) = warp(phi, du) + du`` on the GPU in one pass: apply du first, then phi.

    Bit for bit :func:`iirp.kernels.warp.compose`.

    Args:
        phi: ``(3, X, Y, Z)`` float32 CUDA array, displacement in voxels, component c along axis c.
        du: ``(3, X, Y, Z)`` float32 CUDA array, displacement in voxels, applied first.
        out: optional ``(3, X, Y, Z)`` float32 CUDA array, written in place and
            returned; must not overlap ``phi`` or ``du``.
        stream: stream to launch on (see module doc); not synchronized.

    Returns:
        ``out`` (or the new array): the composed displacement in voxels.

    Raises:
        TypeError, ValueError: as :func:`warp`.
    """
    p = _view("compose", "phi", phi, (_F32,))
    d = _view("compose", "du", du, (_F32,))
    _check_ndim("compose", "phi", p, "(3, X, Y, Z)", (4,))
    if p.shape[0] != 3:
        _check_shape("compose", "phi", p, (3, *p.shape[1:]))
    _check_shape("compose", "du", d, p.shape)
    n = _check_voxels("compose", "phi", p.shape[1:])
    device_id = _device_id("compose", {"phi": p, "du": d})
    o = _out("compose", out, p, p.shape, _F32, device_id, {"phi": p, "du": d})
    if n:
        run = _stream("compose", stream, p, device_id)
        kernel = cuda_build.get_kernels("warp.cu", device_id)["iirp_compose"]
        cuda_build.launch(kernel, cuda_build.ceil_div(n, _BLOCK), _BLOCK, run, p.ptr, d.ptr, o.ptr,
                          *(np.int32(e) for e in p.shape[1:]))
    return o.obj


def upsample(flow: Any, factor: int, *, out: Any = None, stream: Any = None) -> Any:
    """``up_s(u) = s * trilinear_resize(u, s x, align_corners=True)`` on the GPU, ``s = factor``.

    Bit for bit :func:`iirp.kernels.upsample.upsample` (PyTorch's index and
    weight arithmetic in float32); factor 1 copies.

    Args:
        flow: ``(3, x, y, z)`` float32 CUDA array, displacement in voxels of the
            coarse grid, component c along array axis c.
        factor: integer scale s >= 1 (2 between pyramid levels).
        out: optional ``(3, s x, s y, s z)`` float32 CUDA array, written in place
            and returned; must not overlap ``flow``.
        stream: stream to launch on (see module doc); not synchronized.

    Returns:
        ``out`` (or the new array): displacement in voxels of the fine grid.

    Raises:
        TypeError: flow is not a float32 CUDA array, or factor is not an integer.
        ValueError: flow is not ``(3, x, y, z)``, factor < 1, or ``out`` is unusable.
    """
    f = _view("upsample", "flow", flow, (_F32,))
    factor = check_factor("upsample", factor)
    _check_ndim("upsample", "flow", f, "(3, x, y, z)", (4,))
    if f.shape[0] != 3:
        _check_shape("upsample", "flow", f, (3, *f.shape[1:]))
    fine = tuple(factor * e for e in f.shape[1:])
    n = _check_voxels("upsample", "out", fine)
    device_id = _device_id("upsample", {"flow": f})
    o = _out("upsample", out, f, (3, *fine), _F32, device_id, {"flow": f})
    if n:
        run = _stream("upsample", stream, f, device_id)
        kernel = cuda_build.get_kernels("upsample.cu", device_id)["iirp_upsample"]
        cuda_build.launch(kernel, cuda_build.ceil_div(n, _BLOCK), _BLOCK, run, f.ptr, o.ptr,
                          *(np.int32(e) for e in f.shape[1:]), np.int32(factor))
    return o.obj


def upsample2(flow: Any, *, out: Any = None, stream: Any = None) -> Any:
    """``up2(u) = 2 * trilinear_resize(u, 2x, align_corners=True)``: :func:`upsample` with factor 2.

    Args:
        flow: ``(3, x, y, z)`` float32 CUDA array, displacement in voxels of the coarse grid.
        out: optional ``(3, 2x, 2y, 2z)`` float32 CUDA array, written in place and returned.
        stream: stream to launch on (see module doc); not synchronized.

    Returns:
        ``(3, 2x, 2y, 2z)`` float32 displacement in voxels of the fine grid.

    Raises:
        TypeError, ValueError: as :func:`upsample`.
    """
    return upsample(flow, 2, out=out, stream=stream)


def warp_labels(labels: Any, flow: Any, *, out: Any = None, stream: Any = None) -> Any:
    """Nearest-neighbour warp of a label map: ``out[p] = labels[round(p + u(p))]``, 0 outside.

    Rounding is half up on each axis, ``round(t) = floor(t + 1/2)`` computed
    exactly; a point is outside unless ``-1/2 <= t < n - 1/2`` on every axis
    (NaN and infinities are outside), where the label is 0. This is ITK's
    nearest-neighbour interpolation (what ``sitk.Resample(..., sitkNearestNeighbor)``
    does on the index grid). Labels are copied, never interpolated.

    Args:
        labels: ``(X, Y, Z)`` int32, int16 or uint8 CUDA array.
        flow: ``(3, X, Y, Z)`` float32 CUDA array, displacement in voxels of the
            labels' grid, component c along array axis c.
        out: optional CUDA array of labels' shape and dtype, written in place and
            returned; must not overlap ``labels`` or ``flow``.
        stream: stream to launch on (see module doc); not synchronized.

    Returns:
        ``out`` (or the new array): the warped label map, labels' shape and dtype.

    Raises:
        TypeError, ValueError: as :func:`warp`.
    """
    lab = _view("warp_labels", "labels", labels, tuple(_LABEL_TYPES))
    f = _view("warp_labels", "flow", flow, (_F32,))
    _check_ndim("warp_labels", "labels", lab, "(X, Y, Z)", (3,))
    _check_shape("warp_labels", "flow", f, (3, *lab.shape))
    n = _check_voxels("warp_labels", "labels", lab.shape)
    device_id = _device_id("warp_labels", {"labels": lab, "flow": f})
    o = _out("warp_labels", out, lab, lab.shape, lab.dtype, device_id, {"labels": lab, "flow": f})
    if n:
        run = _stream("warp_labels", stream, lab, device_id)
        kernel = cuda_build.get_kernels("warp.cu", device_id)[f"iirp_warp_nearest<{_LABEL_TYPES[lab.dtype]}>"]
        cuda_build.launch(kernel, cuda_build.ceil_div(n, _BLOCK), _BLOCK, run, lab.ptr, f.ptr, o.ptr,
                          *(np.int32(e) for e in lab.shape))
    return o.obj


def fused_ncc_score(moving: Any, fixed: Any, flow: Any, factor: int, *, stream: Any = None) -> float:
    """IterStop score ``ncc(warp(moving, upsample(flow, factor)), fixed)`` on the GPU in one fused pass.

    Per full-resolution voxel the coarse flow is upsampled on the fly and the
    moving image sampled exactly as :func:`upsample` and :func:`warp` do (each
    term equals the numba one bit for bit); the single-pass float64 sums of a, b,
    a², b², ab are reduced per block, then the block rows in a fixed order (no
    atomics: the score is deterministic for given inputs and shape, on any GPU),
    and the NCC is finished on the host exactly as
    :func:`iirp.kernels.score.fused_ncc_score` does. It agrees with the numba
    score to about 1e-12 (the float64 sums are added in another order).
    Device memory: 40 bytes per 256 voxels, allocated once per device (grown for a
    larger grid) and reused, with a pinned 40-byte host buffer for the sums.

    Synchronizes ``stream`` (the score is returned to the host).

    Args:
        moving: ``(X, Y, Z)`` float32 CUDA array, moving volume at full resolution.
        fixed: ``(X, Y, Z)`` float32 CUDA array, fixed volume at full resolution.
        flow: ``(3, X/factor, Y/factor, Z/factor)`` float32 CUDA array,
            displacement in voxels of the coarse level, component c along axis c.
        factor: full / coarse resolution ratio, ``2 ** (level - 1)`` (1, 2, 4 or 8).
        stream: stream to launch on (see module doc); synchronized before returning.

    Returns:
        The global NCC (unbiased std) as a Python float; 0.0 when either image is constant.

    Raises:
        TypeError: an input is not a float32 CUDA array, or factor is not an integer.
        ValueError: moving is not 3-D, fixed's shape differs, factor < 1, flow is
            not ``(3, X/factor, Y/factor, Z/factor)``, fewer than 2 voxels, or wrong layout/device.
    """
    from iirp.kernels.score import _ncc_from_sums  # the host finish shared with the numba score

    func = "fused_ncc_score"
    m = _view(func, "moving", moving, (_F32,))
    fx = _view(func, "fixed", fixed, (_F32,))
    f = _view(func, "flow", flow, (_F32,))
    factor = check_factor(func, factor)
    _check_ndim(func, "moving", m, "(X, Y, Z)", (3,))
    _check_shape(func, "fixed", fx, m.shape)
    if any(e % factor for e in m.shape):
        raise ValueError(f"{func}() 'moving' shape {tuple(m.shape)} must be divisible by 'factor' {factor}")
    _check_shape(func, "flow", f, (3, *(e // factor for e in m.shape)))
    n = _check_voxels(func, "moving", m.shape)
    if n < 2:
        raise ValueError(f"{func}() 'moving' needs at least 2 voxels, got shape {tuple(m.shape)}")
    device_id = _device_id(func, {"moving": m, "fixed": fx, "flow": f})
    run = _stream(func, stream, m, device_id)
    kernels = cuda_build.get_kernels("score.cu", device_id)
    blocks = cuda_build.ceil_div(n, _SCORE_BLOCK)
    with _score_workspace(device_id, blocks, run) as (partials, sums_ptr, pinned):
        cuda_build.launch(kernels["iirp_score_partials"], blocks, _SCORE_BLOCK, run, m.ptr, fx.ptr, f.ptr, partials,
                          *(np.int32(e) for e in m.shape), np.int32(factor))
        cuda_build.launch(kernels["iirp_score_sum"], 1, _SCORE_BLOCK, run, partials, np.int32(blocks), sums_ptr)
        sums = np.empty(5, dtype=np.float64)
        cuda_build.copy_to_host(sums_ptr, sums, run, pinned)  # synchronizes run: the workspace is free again
    return _ncc_from_sums(n, *(float(v) for v in sums))


@dataclass
class _ScoreWorkspace:
    """One device's score buffers, kept between calls: per-block partials + 5 sums on the device, 5 pinned doubles."""

    lock: threading.Lock
    scratch: Any = None
    capacity_blocks: int = -1
    pinned: Any = None


_WORKSPACES: dict[int, _ScoreWorkspace] = {}
_WORKSPACES_LOCK = threading.Lock()


@contextmanager
def _score_workspace(device_id: int, blocks: int, stream: Any) -> Iterator[tuple[int, int, Any]]:
    """``(partials pointer, sums pointer, pinned staging)`` for a score of ``blocks`` blocks on ``device_id``.

    The buffers are allocated on first use and grown when a larger grid needs it, never per call:
    the score runs in IterStop's inner loop. Held under a per-device lock until the caller's copy to
    the host has synchronized ``stream``, so two threads never share them mid-flight.
    """
    with _WORKSPACES_LOCK:
        space = _WORKSPACES.setdefault(device_id, _ScoreWorkspace(threading.Lock()))
    with space.lock:
        if space.capacity_blocks < blocks:
            if space.scratch is not None:
                cuda_build.free_buffer(space.scratch, stream)
            space.scratch = cuda_build.device_scratch(8 * 5 * (blocks + 1), device_id, stream)
            space.capacity_blocks = blocks
        if space.pinned is None:
            space.pinned = cuda_build.pinned_buffer(8 * 5)
        partials = cuda_build.buffer_pointer(space.scratch)
        yield partials, partials + 8 * 5 * space.capacity_blocks, space.pinned
