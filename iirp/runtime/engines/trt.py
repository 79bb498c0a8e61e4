"""TensorRT backend (TensorRT 10/11, ``execute_async_v3``, name-based tensor API) on device arrays.

Zero copy: every input is bound by its own device pointer (``set_tensor_address`` with the
CuPy array's address), every output is a buffer of the placement allocated once per shape and
reused on every call (:attr:`TrtBackend.reuses_outputs`: an output is valid until this stage runs
again), and the engine runs on the placement's stream; nothing is copied to or from the host
and nothing synchronizes. Engines built for another GPU (compute capability) or TensorRT version
are refused before they are deserialised.

UNVERIFIED: TensorRT cannot be installed on the machines this was written on. It follows
TensorRT's documented Python API and is tested against a fake ``tensorrt`` module
(tests/runtime/test_trt_backend.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from iirp.errors import IirpError
from iirp.manifest import ManifestMismatchError
from iirp.runtime.engines.base import Backend, output_shapes, register_backend
from iirp.runtime.placement import array_pointer

__all__ = ["TrtBackend", "check_built_for"]


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
    """One serialized TensorRT engine, run on the placement's device arrays and stream."""

    device_kinds = ("cuda",)
    reuses_outputs = True

    @property
    def runs_on(self) -> str:
        return f"trt-{self.manifest.precision}"

    def _activate(self) -> None:
        try:
            import tensorrt as trt
        except ImportError as err:
            raise IirpError("engine 'trt' needs TensorRT (pip install 'iirp[gpu-cu12]', or gpu-cu13)") from err
        from iirp.kernels.cuda_build import gpu_identity

        built = self.manifest.tensorrt
        if not built or not self.spec.engine_file:
            raise ManifestMismatchError(f"engine folder {self.folder} has no TensorRT engines (export with --trt)")
        check_built_for(self.folder, built, gpu_identity(self.placement.device.index), trt.__version__)
        assert self.folder is not None
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        engine_bytes = (self.folder / self.spec.engine_file).read_bytes()
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise IirpError(f"TensorRT could not deserialize {self.folder / self.spec.engine_file}")
        self.context = self.engine.create_execution_context()
        self.dtypes = {t.name: np.dtype(trt.nptype(self.engine.get_tensor_dtype(t.name)))
                       for t in (*self.spec.inputs, *self.spec.outputs)}
        wrong = {name: str(dtype) for name, dtype in self.dtypes.items() if dtype != np.float32}
        if wrong:
            raise ManifestMismatchError(f"TensorRT engine of stage {self.name} has non-float32 I/O {wrong}")
        self.outputs: dict[str, Any] = {}  # output name -> its buffer on the placement, allocated once per shape

    def _release(self) -> None:
        for attr in ("context", "engine", "runtime", "logger", "outputs"):
            self.__dict__.pop(attr, None)

    def _infer(self, feeds: dict[str, Any]) -> dict[str, Any]:
        context = self.context
        for name, array in feeds.items():
            context.set_input_shape(name, tuple(array.shape))
            context.set_tensor_address(name, array_pointer(array))  # the array's own memory: no copy
        for name, shape in output_shapes(self.spec, feeds).items():
            reported = tuple(int(d) for d in context.get_tensor_shape(name))
            if reported != shape:
                raise ManifestMismatchError(f"TensorRT stage {self.name}: output {name!r} is {reported}, the "
                                            f"manifest says {shape}")
            buffer = self.outputs.get(name)
            if buffer is None or tuple(buffer.shape) != shape:
                buffer = self.outputs[name] = self.placement.empty(shape)
            context.set_tensor_address(name, array_pointer(buffer))
        if not context.execute_async_v3(self.placement.stream_handle):
            raise IirpError(f"TensorRT execution of stage {self.name} failed")
        return {t.name: self.outputs[t.name] for t in self.spec.outputs}
