"""TensorRT backend (TensorRT 10/11, ``execute_async_v3``, name-based tensor API).

UNVERIFIED: TensorRT cannot be installed on the machines this was written on.
It follows TensorRT's documented Python API and cuda-python's runtime
bindings (``cudaMalloc``, ``cudaMemcpyAsync``, streams), and refuses engines
built for another GPU or TensorRT version before deserialising them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from iirp.errors import IirpError
from iirp.manifest import ManifestMismatchError
from iirp.runtime.engines.base import Backend, register_backend

__all__ = ["TrtBackend", "check_built_for", "current_gpu"]


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        except ImportError as err:
            raise IirpError("engine 'trt' needs cuda-python: pip install cuda-python") from err
    return cudart


def _check(result: Any) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple, raising on an error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise IirpError(f"CUDA runtime error {err}")
    return values[0] if len(values) == 1 else values


def current_gpu(device_id: int = 0) -> dict[str, str]:
    """Name and compute capability (``"9.0"``) of a CUDA device."""
    props = _check(_cudart().cudaGetDeviceProperties(device_id))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"gpu_name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}


def check_built_for(folder: object, built: dict[str, Any], gpu: dict[str, str], trt_version: str) -> None:
    """Check that engines recorded as ``built`` (the manifest's ``tensorrt``) can run on ``gpu``.

    TensorRT engines are specific to the compute capability and the TensorRT version
    that built them; the name is reported but not compared (same-architecture cards share
    engines).

    Raises:
        ManifestMismatchError: another compute capability or TensorRT version.
    """
    if gpu["compute_capability"] != built.get("compute_capability") or trt_version != built.get("tensorrt_version"):
        raise ManifestMismatchError(
            f"TensorRT engines in {folder} were built for {built.get('gpu_name')} "
            f"(sm {built.get('compute_capability')}, TensorRT {built.get('tensorrt_version')}); this is "
            f"{gpu['gpu_name']} (sm {gpu['compute_capability']}, TensorRT {trt_version}): re-export with --trt"
        )


@register_backend("trt")
class TrtBackend(Backend):
    """One serialized TensorRT engine; host arrays in and out through device buffers on one stream."""

    def _activate(self) -> None:
        try:
            import tensorrt as trt
        except ImportError as err:
            raise IirpError("engine 'trt' needs TensorRT (pip install tensorrt from NVIDIA's index)") from err
        built = self.manifest.tensorrt
        if not built or not self.spec.engine_file:
            raise ManifestMismatchError(f"engine folder {self.folder} has no TensorRT engines (export with --trt)")
        device_id = int(self.device.partition(":")[2] or 0)
        check_built_for(self.folder, built, current_gpu(device_id), trt.__version__)
        self.cudart = _cudart()
        _check(self.cudart.cudaSetDevice(device_id))
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        engine_bytes = (self.folder / self.spec.engine_file).read_bytes()
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise IirpError(f"TensorRT could not deserialize {self.folder / self.spec.engine_file}")
        self.context = self.engine.create_execution_context()
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.trt = trt
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def _buffer(self, name: str, nbytes: int) -> int:
        pointer, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                _check(self.cudart.cudaFree(pointer))
            pointer = int(_check(self.cudart.cudaMalloc(nbytes)))
            self.buffers[name] = (pointer, nbytes)
        return pointer

    def _release(self) -> None:
        for pointer, _ in getattr(self, "buffers", {}).values():
            self.cudart.cudaFree(pointer)
        if getattr(self, "stream", None) is not None:
            self.cudart.cudaStreamDestroy(self.stream)
        for attr in ("context", "engine", "runtime", "buffers", "stream"):
            self.__dict__.pop(attr, None)

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, trt = self.cudart, self.trt
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, array in feeds.items():
            self.context.set_input_shape(name, array.shape)
            pointer = self._buffer(name, array.nbytes)
            _check(cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, h2d, self.stream))
            self.context.set_tensor_address(name, pointer)
        outputs: dict[str, np.ndarray] = {}
        for tensor in self.spec.outputs:
            shape = tuple(self.context.get_tensor_shape(tensor.name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(tensor.name)))
            outputs[tensor.name] = np.empty(shape, dtype=dtype)
            self.context.set_tensor_address(tensor.name, self._buffer(tensor.name, outputs[tensor.name].nbytes))
        if not self.context.execute_async_v3(int(self.stream)):
            raise IirpError(f"TensorRT execution of stage {self.name} failed")
        for name, array in outputs.items():
            pointer, _ = self.buffers[name]
            _check(cudart.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes, d2h, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return {name: array.astype(np.float32, copy=False) for name, array in outputs.items()}
