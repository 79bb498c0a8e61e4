"""onnxruntime backend: CPU provider, or the CUDA provider with I/O binding where onnxruntime-gpu is installed.

The CUDA path is written against onnxruntime's documented I/O binding API
but is unverified here (no GPU build of onnxruntime on the CPU machines).
"""

from __future__ import annotations

import numpy as np

from iirp.errors import IirpError
from iirp.runtime.engines.base import Backend, register_backend

__all__ = ["OrtBackend"]


@register_backend("ort")
class OrtBackend(Backend):
    """One ONNX stage in an ``onnxruntime.InferenceSession``."""

    def _activate(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise IirpError("engine 'ort' needs onnxruntime: pip install onnxruntime") from err
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
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
