"""Run-time compilation (NVRTC through ``cuda.core``) and launch of the CUDA kernels.

This is the only module that imports ``cuda.core``; its namespace moved between
releases (``cuda.core.experimental`` in 0.x, ``cuda.core`` from 1.0), so the
import is resolved once, lazily, in :func:`_core`. Importing this module needs
neither ``cuda.core`` nor a GPU; compiling needs ``cuda.core``, ``cuda-bindings``
and an NVRTC library (the ``nvidia-cuda-nvrtc-cu12`` wheel is enough: no CUDA
toolkit, no driver); loading and launching need a device.

Sources are the ``.cu`` files of :mod:`iirp.kernels` ``/cuda``, read through
:mod:`importlib.resources` (``sampling.cuh`` is found through an include path on
the same folder, so the package must be installed as files, not zipped). Each
source is compiled to a cubin for one ``sm_XX`` architecture, with one name
expression per kernel / template instantiation (:data:`KERNELS`), and cached per
process by (sha256 of the source and headers, arch, options).

Compile options (:data:`COMPILE_OPTIONS`): C++17, ``--fmad=false`` (no FMA
contraction), IEEE division and square root, no flush-to-zero, so every float32
operation rounds as in the numba reference kernels and the results match them
bit for bit; ptxas warns on register spills and on local memory use. Warnings
never fail a build at run time (they are logged); the compile test fails on any
(:attr:`CompiledSource.warnings`).

Kernels launch on an explicit :class:`cuda.core.Stream` (see :func:`as_stream`);
nothing here synchronizes except :func:`copy_to_host`.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from iirp.errors import IirpError

__all__ = [
    "KERNELS",
    "COMPILE_OPTIONS",
    "KernelCompileError",
    "CudaUnavailableError",
    "CompiledSource",
    "ceil_div",
    "source_text",
    "source_digest",
    "compile_cuda",
    "compile_source",
    "nvrtc_version",
    "device_arch",
    "gpu_identity",
    "peak_memory_bandwidth",
    "use_device",
    "get_kernels",
    "as_stream",
    "launch",
    "device_scratch",
    "buffer_pointer",
    "free_buffer",
    "pinned_buffer",
    "copy_to_host",
    "cubin_cache_path",
]

_log = logging.getLogger(__name__)

#: Kernel sources of ``iirp/kernels/cuda`` and the name expressions compiled from each:
#: every kernel, and every template instantiation (``iirp_half`` is fp16 storage).
KERNELS: dict[str, tuple[str, ...]] = {
    "warp.cu": (
        "iirp_warp<float>",
        "iirp_warp<iirp_half>",
        "iirp_compose",
        "iirp_warp_nearest<int>",
        "iirp_warp_nearest<short>",
        "iirp_warp_nearest<unsigned char>",
    ),
    "upsample.cu": ("iirp_upsample",),
    "score.cu": ("iirp_score_partials", "iirp_score_sum"),
}

#: ``cuda.core.ProgramOptions`` fields used for every compile (plus name, arch and the include path).
COMPILE_OPTIONS: dict[str, Any] = {
    "std": "c++17",
    "fma": False,  # --fmad=false: float32 rounds like the numba kernels (fastmath off)
    "prec_div": True,
    "prec_sqrt": True,
    "ftz": False,
    "no_source_include": True,
    "ptxas_options": ["--warn-on-spills", "--warn-on-local-memory-usage"],
}

_HEADER_SUFFIX = ".cuh"
_ARCH = re.compile(r"^sm_\d{2,3}[a-z]?$")
_ELF_MAGIC = b"\x7fELF"


class KernelCompileError(IirpError):
    """NVRTC failed to compile a kernel source; ``log`` holds the compiler log."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message)
        self.log = log


class CudaUnavailableError(IirpError):
    """``cuda.core`` (or its NVRTC / driver libraries) or a CUDA device is missing."""


_CORE: Any = None
_LOCK = threading.Lock()
_COMPILED: dict[tuple[str, str, str], "CompiledSource"] = {}
_KERNELS: dict[tuple[str, int], dict[str, Any]] = {}
_NVRTC_OK = False


def _core() -> Any:
    """The ``cuda.core`` namespace that holds Program, Device, launch... (1.x top level, else 0.x experimental).

    Raises:
        CudaUnavailableError: cuda.core (or the cuda.bindings it needs) is not installed.
    """
    global _CORE
    if _CORE is None:
        try:
            import cuda.core as core

            core.Program  # noqa: B018 - 0.x has the package but keeps the API in .experimental
        except (ImportError, AttributeError):
            try:
                import cuda.core.experimental as core  # type: ignore[no-redef]
            except ImportError as err:
                raise CudaUnavailableError(
                    "the CUDA kernels need cuda.core with cuda-bindings and NVRTC: pip install 'iirp[cuda]'"
                ) from err
        _CORE = core
    return _CORE


def ceil_div(n: int, d: int) -> int:
    """``ceil(n / d)`` for integers ``n >= 0``, ``d > 0``: the number of blocks of ``d`` covering ``n`` items."""
    return -(-int(n) // int(d))


def _source_folder() -> Path:
    """The folder of the ``.cu`` / ``.cuh`` files (the include path of every compile)."""
    folder = resources.files("iirp.kernels").joinpath("cuda")
    path = Path(str(folder))
    if not path.is_dir():
        raise KernelCompileError(f"CUDA kernel sources must be installed as files, not found at {folder}")
    return path


def source_text(name: str) -> str:
    """Text of kernel source ``name`` (a key of :data:`KERNELS`), read through importlib.resources.

    Raises:
        ValueError: ``name`` is not a kernel source.
    """
    if name not in KERNELS:
        raise ValueError(f"source_text() 'name' must be one of {sorted(KERNELS)}, got {name!r}")
    return resources.files("iirp.kernels").joinpath("cuda").joinpath(name).read_text(encoding="utf-8")


def source_digest(name: str) -> str:
    """sha256 (hex) of source ``name`` and of every ``.cuh`` header beside it (what the compile reads)."""
    digest = hashlib.sha256()
    digest.update(name.encode() + b"\0" + source_text(name).encode() + b"\0")
    for header in sorted(p for p in _source_folder().iterdir() if p.suffix == _HEADER_SUFFIX):
        digest.update(header.name.encode() + b"\0" + header.read_bytes() + b"\0")
    return digest.hexdigest()


@dataclass(frozen=True, eq=False)
class CompiledSource:
    """A source compiled to a cubin for one architecture.

    Attributes:
        name: source file name, e.g. ``"warp.cu"``.
        arch: target, e.g. ``"sm_90"``.
        digest: sha256 of what was compiled (see :func:`source_digest`); empty for :func:`compile_cuda` text.
        log: NVRTC program log (front-end and ptxas diagnostics), NUL bytes stripped; empty when clean.
        symbols: name expression -> lowered (mangled) kernel name.
        cubin: the ELF image.
        object_code: the ``cuda.core.ObjectCode`` it came from.
    """

    name: str
    arch: str
    digest: str
    log: str
    symbols: dict[str, str] = field(repr=False)
    cubin: bytes = field(repr=False)
    object_code: Any = field(repr=False)

    @property
    def warnings(self) -> tuple[str, ...]:
        """Log lines that report a warning (NVRTC ``warning #...`` and ``ptxas warning``); empty when clean."""
        return tuple(line for line in self.log.splitlines() if "warning" in line.lower())


def _check_arch(func: str, arch: Any) -> str:
    if not isinstance(arch, str) or not _ARCH.match(arch):
        raise ValueError(f"{func}() 'arch' must look like 'sm_80' or 'sm_90a' (a cubin target), got {arch!r}")
    return arch


def compile_cuda(text: str, *, name: str, arch: str, name_expressions: tuple[str, ...]) -> CompiledSource:
    """Compile CUDA C++ ``text`` to a cubin for ``arch`` with NVRTC (no cache).

    Uses :data:`COMPILE_OPTIONS` and the kernel source folder as include path.
    Needs cuda.core and NVRTC but no GPU.

    Args:
        text: CUDA C++ source.
        name: file name shown in diagnostics, e.g. ``"warp.cu"``.
        arch: cubin target ``"sm_XY"``, e.g. ``"sm_80"``.
        name_expressions: kernels to look up afterwards, e.g. ``("iirp_warp<float>",)``.

    Returns:
        The :class:`CompiledSource` (``digest`` empty); warnings are logged, never raised.

    Raises:
        ValueError: ``arch`` is not an ``sm_XY`` target.
        CudaUnavailableError: cuda.core or the NVRTC library is missing.
        KernelCompileError: NVRTC failed (the error carries the log) or returned no cubin.
    """
    _check_arch("compile_cuda", arch)
    core = _core()
    _require_nvrtc()
    options = core.ProgramOptions(name=name, arch=arch, include_path=[str(_source_folder())], **COMPILE_OPTIONS)
    logs = io.StringIO()
    program = None
    try:
        program = core.Program(text, "c++", options)
        object_code = program.compile("cubin", name_expressions=tuple(name_expressions), logs=logs)
    except Exception as err:  # noqa: BLE001 - NVRTCError and friends live in version-dependent modules
        log = (logs.getvalue() + "\n" + str(err)).replace("\x00", "").strip()
        raise KernelCompileError(f"compile_cuda() could not compile {name} for {arch}:\n{log}", log) from err
    finally:
        if program is not None:
            program.close()
    log = logs.getvalue().replace("\x00", "").strip()
    cubin = bytes(object_code.code)
    if not cubin.startswith(_ELF_MAGIC):
        raise KernelCompileError(f"compile_cuda() got no cubin for {name} ({arch})", log)
    symbols = {str(k): (v.decode() if isinstance(v, bytes) else str(v)) for k, v in object_code.symbol_mapping.items()}
    missing = [expr for expr in name_expressions if expr not in symbols]
    if missing:
        raise KernelCompileError(f"compile_cuda() found no kernel for {missing} in {name} ({arch})", log)
    result = CompiledSource(name, arch, "", log, symbols, cubin, object_code)
    for line in result.warnings:
        _log.warning("%s (%s): %s", name, arch, line)
    return result


def compile_source(name: str, arch: str) -> CompiledSource:
    """Kernel source ``name`` compiled for ``arch`` with every name expression of :data:`KERNELS`; cached.

    Cached per process, and on disk in ``<cache>/cubin`` (:func:`iirp.cache.cache_dir`) so a new
    process loads the cubin instead of running NVRTC again. The key is (sha256 of the source and
    headers, arch, :data:`COMPILE_OPTIONS`, NVRTC version); a cached file that is not a cubin with
    every expected kernel is ignored and rebuilt. Thread-safe; needs no GPU.

    Args:
        name: a key of :data:`KERNELS`, e.g. ``"warp.cu"``.
        arch: cubin target, e.g. ``"sm_80"``.

    Raises:
        ValueError: unknown ``name`` or malformed ``arch``.
        CudaUnavailableError, KernelCompileError: as :func:`compile_cuda`.
    """
    if name not in KERNELS:
        raise ValueError(f"compile_source() 'name' must be one of {sorted(KERNELS)}, got {name!r}")
    _check_arch("compile_source", arch)
    digest = source_digest(name)
    key = (digest, arch, repr(sorted(COMPILE_OPTIONS.items())))
    with _LOCK:
        cached = _COMPILED.get(key)
        if cached is None:
            cached = _load_cubin(name, arch, digest)
        if cached is None:
            built = compile_cuda(source_text(name), name=name, arch=arch, name_expressions=KERNELS[name])
            cached = CompiledSource(name, arch, digest, built.log, built.symbols, built.cubin, built.object_code)
            _save_cubin(cached)
        _COMPILED[key] = cached
    return cached


def cubin_cache_path(name: str, arch: str, digest: str) -> Path:
    """Where :func:`compile_source` keeps the cubin of ``name`` for ``arch`` (its kernel names beside it)."""
    from iirp.cache import cache_dir

    options = hashlib.sha256(repr(sorted(COMPILE_OPTIONS.items())).encode()).hexdigest()[:12]
    major, minor = nvrtc_version()
    return cache_dir("cubin") / f"{Path(name).stem}-{arch}-nvrtc{major}.{minor}-{digest[:16]}-{options}.cubin"


def _load_cubin(name: str, arch: str, digest: str) -> CompiledSource | None:
    """The cached compile of ``name`` from disk, or None (absent, unreadable or incomplete)."""
    try:
        path = cubin_cache_path(name, arch, digest)
        cubin = path.read_bytes()
        record = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError, CudaUnavailableError):
        return None
    symbols = record.get("symbols") if isinstance(record, dict) else None
    log = record.get("log") if isinstance(record, dict) else None
    if not cubin.startswith(_ELF_MAGIC) or not isinstance(symbols, dict) or not isinstance(log, str) or any(
            not isinstance(symbols.get(expr), str) for expr in KERNELS[name]):
        return None
    return CompiledSource(name, arch, digest, log, dict(symbols), cubin, _core().ObjectCode.from_cubin(cubin))


def _save_cubin(compiled: CompiledSource) -> None:
    """Keep a compile on disk for the next process; a cache that cannot be written is only logged."""
    from iirp.atomic import write_bytes, write_text
    from iirp.errors import OutputError

    try:
        path = cubin_cache_path(compiled.name, compiled.arch, compiled.digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"symbols": compiled.symbols, "log": compiled.log}
        write_text(path.with_suffix(".json"), json.dumps(record))  # the names first, the cubin last
        write_bytes(path, compiled.cubin)
    except (OSError, OutputError, CudaUnavailableError) as err:
        _log.info("cubin cache not written: %s", err)


def _require_nvrtc() -> None:
    """Raise :class:`CudaUnavailableError` (not a compile error) when no NVRTC library can be loaded."""
    global _NVRTC_OK
    if not _NVRTC_OK:
        try:
            nvrtc_version()
        except CudaUnavailableError as err:
            raise CudaUnavailableError(
                f"{err}; install an NVRTC wheel (pip install 'iirp[cuda]', i.e. nvidia-cuda-nvrtc-cu12)"
            ) from err
        _NVRTC_OK = True


def nvrtc_version() -> tuple[int, int]:
    """``(major, minor)`` of the NVRTC library that compiles the kernels (for benchmark and manifest records).

    Raises:
        CudaUnavailableError: cuda-bindings or NVRTC is missing.
    """
    try:
        try:
            from cuda.bindings import nvrtc
        except ImportError:  # cuda-python < 12.6
            from cuda import nvrtc  # type: ignore[no-redef]
        status, major, minor = nvrtc.nvrtcVersion()
    except Exception as err:  # noqa: BLE001 - a missing library surfaces as various errors
        raise CudaUnavailableError(f"NVRTC is not available: {str(err).strip()}") from err
    if int(status) != 0:
        raise CudaUnavailableError(f"nvrtcVersion() failed with {status}")
    return int(major), int(minor)


def device_arch(device_id: int) -> str:
    """Cubin target of CUDA device ``device_id``, e.g. ``"sm_90"`` for compute capability 9.0."""
    cc = _core().Device(int(device_id)).compute_capability
    return f"sm_{cc.major}{cc.minor}"


def gpu_identity(device_id: int) -> dict[str, str]:
    """``{"gpu_name", "compute_capability"}`` (``"9.0"``) of CUDA device ``device_id`` (what a TensorRT engine is for).

    Raises:
        CudaUnavailableError: no cuda.core, no driver or no such device.
    """
    try:
        device = _core().Device(int(device_id))
        cc = device.compute_capability
        return {"gpu_name": str(device.name), "compute_capability": f"{cc.major}.{cc.minor}"}
    except CudaUnavailableError:
        raise
    except Exception as err:  # noqa: BLE001 - no driver / no such device
        raise CudaUnavailableError(f"CUDA device {device_id} is not available: {err}") from err


def peak_memory_bandwidth(device_id: int) -> float:
    """Theoretical DRAM bandwidth of device ``device_id`` in bytes/s: memory clock x bus width x 2 (DDR).

    From the device attributes ``memory_clock_rate`` (kHz) and ``global_memory_bus_width`` (bits).
    """
    props = _core().Device(int(device_id)).properties
    return float(props.memory_clock_rate) * 1e3 * float(props.global_memory_bus_width) / 8.0 * 2.0


def use_device(device_id: int) -> Any:
    """Make the primary context of device ``device_id`` current on this thread (PyTorch uses the same); its Device."""
    try:
        device = _core().Device(int(device_id))
        device.set_current()
    except CudaUnavailableError:
        raise
    except Exception as err:  # noqa: BLE001 - no driver / no such device
        raise CudaUnavailableError(f"CUDA device {device_id} is not available: {err}") from err
    return device


def get_kernels(name: str, device_id: int) -> dict[str, Any]:
    """Kernels of source ``name`` loaded on device ``device_id``, by name expression; cached per process.

    Compiles for the device's own architecture (:func:`device_arch`) and loads the
    cubin once per device. Makes the device current (:func:`use_device`).

    Raises:
        CudaUnavailableError: no cuda.core or no such device.
        KernelCompileError: compilation failed (e.g. an NVRTC too old for the device).
    """
    use_device(device_id)
    key = (name, int(device_id))
    with _LOCK:
        kernels = _KERNELS.get(key)
    if kernels is None:
        compiled = compile_source(name, device_arch(device_id))
        module = _core().ObjectCode.from_cubin(compiled.cubin)
        kernels = {expr: module.get_kernel(compiled.symbols[expr]) for expr in KERNELS[name]}
        with _LOCK:
            kernels = _KERNELS.setdefault(key, kernels)
    return kernels


def as_stream(stream: Any) -> Any:
    """A ``cuda.core`` Stream for ``stream`` (not owned: the caller keeps the stream alive).

    Args:
        stream: a cuda.core Stream (returned as is), a raw ``cudaStream_t`` handle
            as an int (0 is the legacy default stream), or an object with the
            ``__cuda_stream__()`` protocol.

    Raises:
        TypeError: anything else.
    """
    core = _core()
    if isinstance(stream, core.Stream):
        return stream
    if hasattr(stream, "__cuda_stream__") and not isinstance(stream, (int, np.integer)):
        _, handle = stream.__cuda_stream__()
        stream = handle
    if isinstance(stream, (bool, np.bool_)) or not isinstance(stream, (int, np.integer)):
        raise TypeError(f"as_stream() 'stream' must be a stream or an int handle, got {type(stream).__name__}")
    handle = int(stream)
    if handle == 0 and hasattr(core, "LEGACY_DEFAULT_STREAM"):
        return core.LEGACY_DEFAULT_STREAM
    return core.Stream.from_handle(handle)


def launch(kernel: Any, grid: int, block: int, stream: Any, *args: Any) -> None:
    """Launch ``kernel`` on a 1-D grid of ``grid`` blocks of ``block`` threads on ``stream`` (asynchronous).

    Args:
        kernel: from :func:`get_kernels`.
        grid: number of blocks (use :func:`ceil_div`), >= 1.
        block: threads per block.
        stream: a cuda.core Stream (see :func:`as_stream`).
        args: the C arguments in order: device pointers as Python ints, scalars as
            NumPy scalars of the C type (``np.int32`` for ``int``, ``np.float32``
            for ``float``); Python floats and bools are refused (their C width is ambiguous).
    """
    for arg in args:
        assert isinstance(arg, np.generic) or (isinstance(arg, int) and not isinstance(arg, bool)), type(arg)
    core = _core()
    core.launch(stream, core.LaunchConfig(grid=int(grid), block=int(block)), kernel, *args)


def device_scratch(nbytes: int, device_id: int, stream: Any) -> Any:
    """A device buffer of ``nbytes`` bytes from the device's default (stream-ordered) memory resource.

    Release it with :func:`free_buffer` on the same stream.
    """
    return _core().Device(int(device_id)).allocate(int(nbytes), stream=stream)


def buffer_pointer(buffer: Any) -> int:
    """Device address of a cuda.core Buffer as an int (a kernel pointer argument)."""
    return int(buffer.handle)


def free_buffer(buffer: Any, stream: Any) -> None:
    """Release a buffer from :func:`device_scratch`, ordered after the work queued on ``stream``."""
    buffer.close(stream)


def pinned_buffer(nbytes: int) -> Any:
    """A page-locked host buffer of ``nbytes`` bytes (a cuda.core Buffer) for :func:`copy_to_host`; close it after."""
    return _core().LegacyPinnedMemoryResource().allocate(int(nbytes))


def copy_to_host(pointer: int, host: np.ndarray, stream: Any, pinned: Any = None) -> None:
    """Copy ``host.nbytes`` bytes from device address ``pointer`` into ``host`` after the work on ``stream``.

    Goes through a pinned staging buffer (``pinned``, from :func:`pinned_buffer`, at least
    ``host.nbytes``; a temporary one when None) and synchronizes ``stream`` (a documented
    synchronization point: the caller needs the values on the host).

    Args:
        pointer: device address.
        host: C-contiguous, writeable numpy array, overwritten.
        stream: a cuda.core Stream.
        pinned: a reusable pinned staging buffer, or None.
    """
    assert host.flags.c_contiguous and host.flags.writeable
    core = _core()
    nbytes = int(host.nbytes)
    staging = pinned if pinned is not None else core.LegacyPinnedMemoryResource().allocate(nbytes, stream=stream)
    try:
        core.Buffer.from_handle(int(pointer), nbytes).copy_to(staging, stream=stream)
        stream.sync()
        ctypes.memmove(host.ctypes.data, int(staging.handle), nbytes)
    finally:
        if pinned is None:
            staging.close()

