"""onnxruntime backend: CPU provider, or the CUDA provider with I/O binding where onnxruntime-gpu is installed.

The CUDA path is written against onnxruntime's documented I/O binding API
but is unverified here (no GPU build of onnxruntime on the CPU machines).
"""

from __future__ import annotations

import numpy as np

from iirp.errors import IirpError
from iirp.manifest import ManifestMismatchError, TensorSpec
from iirp.runtime.engines.base import Backend, register_backend

__all__ = ["OrtBackend"]


@register_backend("ort")
class OrtBackend(Backend):
    """One ONNX stage in an ``onnxruntime.InferenceSession``."""

    #: Intra-op threads of the sessions built from now on; 0 is onnxruntime's default (one per core).
    #: Set by :func:`iirp.runtime.solver_spec.limit_threads` (a cohort worker's ``--cpus-per-worker``).
    intra_op_threads: int = 0

    def _activate(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise IirpError("engine 'ort' needs onnxruntime: pip install onnxruntime") from err
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.intra_op_num_threads = int(self.intra_op_threads)
        if self.device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise IirpError("device 'cuda' with engine 'ort' needs onnxruntime-gpu (CUDAExecutionProvider)")
            device_id = int(self.device.partition(":")[2] or 0)
            providers: list = [("CUDAExecutionProvider", {"device_id": device_id})]
        else:
            providers = ["CPUExecutionProvider"]
        path = self.folder / self.spec.file
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types
            raise IirpError(f"onnxruntime cannot load {path}: {str(err).splitlines()[0]}") from err
        _check_io(path, "input", self.spec.inputs, self.session.get_inputs())
        _check_io(path, "output", self.spec.outputs, self.session.get_outputs())
        self.output_names = [t.name for t in self.spec.outputs]

    def _release(self) -> None:
        self.__dict__.pop("session", None)

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.device.startswith("cuda"):
            return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name in self.output_names:
            binding.bind_output(name, "cuda", int(self.device.partition(":")[2] or 0))
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))


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
