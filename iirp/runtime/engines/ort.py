"""onnxruntime backend: the CPU provider on host arrays, or the CUDA provider on device arrays.

CUDA (``onnxruntime-gpu``): inputs and outputs are bound to device memory with I/O binding
(``bind_input`` / ``bind_output`` with the arrays' own pointers, no copies), the outputs
preallocated once per shape on the placement and reused (:attr:`OrtBackend.reuses_outputs`),
and the CUDA provider runs on the placement's stream (``user_compute_stream``).
UNVERIFIED: written against onnxruntime's documented I/O binding API; no GPU build of
onnxruntime runs on the machines this was written on.

``onnxruntime`` and ``onnxruntime-gpu`` install the same Python package: with both installed
each breaks the other, so that is one clear error (:func:`check_one_onnxruntime`).
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import numpy as np

from iirp.errors import IirpError
from iirp.manifest import ManifestMismatchError, TensorSpec
from iirp.runtime.engines.base import Backend, output_shapes, register_backend
from iirp.runtime.placement import array_pointer

__all__ = ["OrtBackend", "check_one_onnxruntime"]


def check_one_onnxruntime() -> None:
    """Refuse an environment with both ``onnxruntime`` and ``onnxruntime-gpu`` installed.

    Raises:
        IirpError: both distributions are installed.
    """
    installed = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.version(dist)
            installed.append(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    if len(installed) == 2:
        raise IirpError(
            "both onnxruntime and onnxruntime-gpu are installed; they share one Python package and break each "
            "other: pip uninstall -y onnxruntime onnxruntime-gpu, then install one of them (README, GPU install)"
        )


@register_backend("ort")
class OrtBackend(Backend):
    """One ONNX stage in an ``onnxruntime.InferenceSession`` (CPU provider, or CUDA with I/O binding)."""

    device_kinds = ("cpu", "cuda")

    @property
    def reuses_outputs(self) -> bool:  # type: ignore[override]
        return not self.placement.is_host

    def _activate(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise IirpError("engine 'ort' needs onnxruntime: pip install onnxruntime") from err
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if self.options.threads is not None:
            options.intra_op_num_threads = self.options.threads
        if self.placement.is_host:
            providers: list = ["CPUExecutionProvider"]
            # the arena keeps each session's peak for the process's life (840 MB more at full size);
            # without it a single run took the same time, repeated pairs 16 % longer (README, Memory)
            options.enable_cpu_mem_arena = not self.options.low_memory
        else:
            check_one_onnxruntime()
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise IirpError(f"device {self.device} with engine 'ort' needs onnxruntime-gpu (CUDAExecutionProvider)")
            providers = [("CUDAExecutionProvider", {
                "device_id": self.placement.device.index,
                "user_compute_stream": str(self.placement.stream_handle),  # one stream with the kernels
            })]
        assert self.folder is not None
        path = self.folder / self.spec.file
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types
            raise IirpError(f"onnxruntime cannot load {path}: {str(err).splitlines()[0]}") from err
        _check_io(path, "input", self.spec.inputs, self.session.get_inputs())
        _check_io(path, "output", self.spec.outputs, self.session.get_outputs())
        self.output_names = [t.name for t in self.spec.outputs]
        self.outputs: dict[str, Any] = {}  # CUDA: output name -> its buffer, allocated once per shape

    def _release(self) -> None:
        for attr in ("session", "outputs"):
            self.__dict__.pop(attr, None)

    def _infer(self, feeds: dict[str, Any]) -> dict[str, Any]:
        if self.placement.is_host:
            return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        device_id = self.placement.device.index
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_input(name, "cuda", device_id, np.float32, tuple(array.shape), array_pointer(array))
        for name, shape in output_shapes(self.spec, feeds).items():
            buffer = self.outputs.get(name)
            if buffer is None or tuple(buffer.shape) != shape:
                buffer = self.outputs[name] = self.placement.empty(shape)
            binding.bind_output(name, "cuda", device_id, np.float32, shape, array_pointer(buffer))
        self.session.run_with_iobinding(binding)
        return {name: self.outputs[name] for name in self.output_names}


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32"}


def _check_io(path: object, kind: str, declared: list[TensorSpec], actual: list) -> None:
    """Check the session's inputs or outputs against the manifest: names, dtypes, and every fixed dim.

    Raises:
        ManifestMismatchError: the file does not have the interface the manifest declares.
    """
    got = {a.name: a for a in actual}
    if sorted(got) != sorted(t.name for t in declared):
        raise ManifestMismatchError(
            f"{path}: {kind}s {sorted(got)} differ from the manifest's {sorted(t.name for t in declared)}"
        )
    for spec in declared:
        arg = got[spec.name]
        dtype = _ORT_TYPES.get(arg.type, arg.type)
        fixed = [(d, e) for d, e in zip(arg.shape, spec.shape) if isinstance(d, int) and isinstance(e, int)]
        if dtype != spec.dtype or len(arg.shape) != len(spec.shape) or any(d != e for d, e in fixed):
            raise ManifestMismatchError(
                f"{path}: {kind} {spec.name!r} is {dtype} {list(arg.shape)}, "
                f"the manifest says {spec.dtype} {spec.shape}"
            )
