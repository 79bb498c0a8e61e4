"""PyTorch stages behind the backend interface (engine ``torch``): oneDNN on the CPU, cuDNN on CUDA.

Built from the checkpoint the engine folder was exported from (its path and sha256 are in the
manifest; or the checkpoint itself for ``iirp-run --checkpoint C --engine torch``), so every
engine can be compared stage by stage with the reference. Imports torch and :mod:`iirp.model`
only when entered.

Arrays: on the host numpy (``torch.from_numpy``); on CUDA the placement's CuPy arrays cross to
torch and back through DLPack (zero copy), and the modules run on the placement's stream
(``torch.cuda.ExternalStream``). Weights and activations are in the manifest's precision
(fp16 needs CUDA) with channels-last 3D memory; fp32 runs without TF32, so fp32 means fp32.
Outputs are fresh tensors (never reused).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import numpy as np

from iirp.errors import IirpError
from iirp.manifest import ManifestMismatchError, sha256_file
from iirp.runtime.engines.base import Backend, register_backend

__all__ = ["TorchBackend"]


@register_backend("torch")
class TorchBackend(Backend):
    """One stage run by the PyTorch modules of :class:`iirp.model.RPNet`."""

    device_kinds = ("cpu", "cuda")

    def _activate(self) -> None:
        try:
            import torch

            from iirp.model import load_checkpoint
        except ImportError as err:
            raise IirpError("engine 'torch' needs PyTorch: pip install torch") from err
        if self.options.threads is not None:
            torch.set_num_threads(self.options.threads)  # process-wide, like every torch setting
        cuda = not self.placement.is_host
        if cuda and not torch.cuda.is_available():
            raise IirpError(f"device {self.device} requested but torch sees no CUDA device")
        if self.manifest.precision == "fp16" and not cuda:
            raise IirpError("engine 'torch' computes fp16 only on a CUDA device; use --device cuda or an fp32 export")
        source = self.manifest.source_path
        if not source or not os.path.isfile(source):
            raise ManifestMismatchError(f"engine 'torch' needs the source checkpoint {source!r}, which is missing")
        if sha256_file(source) != self.manifest.source_sha256:
            raise ManifestMismatchError(
                f"checkpoint {source} is not the one the engines were exported from (sha256 differs)"
            )
        net, _ = load_checkpoint(source, size=self.manifest.size)
        self.torch = torch
        self.dtype = torch.float16 if self.manifest.precision == "fp16" else torch.float32
        self.torch_device = torch.device("cuda", self.placement.device.index) if cuda else torch.device("cpu")
        self.format = torch.channels_last_3d
        net = net.to(self.torch_device, dtype=self.dtype).to(memory_format=self.format)  # type: ignore[call-overload]
        if self.name == "feature_extractor":
            self.module = net.encoder.eval()
        else:
            self.module = net.estimator(int(self.name.rsplit("_", 1)[1])).eval()

    def _release(self) -> None:
        for attr in ("module", "torch"):
            self.__dict__.pop(attr, None)

    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[None]:
        """The placement's stream, no TF32 (fp32 means fp32), no autograd."""
        torch = self.torch
        with torch.inference_mode():
            if self.placement.is_host:
                yield
                return
            cudnn = torch.backends.cudnn
            previous = cudnn.allow_tf32
            cudnn.allow_tf32 = False
            stream = torch.cuda.ExternalStream(self.placement.stream_handle, device=self.torch_device)
            try:
                with torch.cuda.stream(stream):
                    yield
            finally:
                cudnn.allow_tf32 = previous

    def _to_torch(self, array: Any) -> Any:
        torch = self.torch
        tensor = torch.from_numpy(array) if self.placement.is_host else torch.from_dlpack(array)
        return tensor.to(dtype=self.dtype).contiguous(memory_format=self.format)

    def _from_torch(self, tensor: Any) -> Any:
        out = tensor.float().contiguous()
        if self.placement.is_host:
            return np.ascontiguousarray(out.numpy())
        import cupy

        return cupy.from_dlpack(out)

    def _infer(self, feeds: dict[str, Any]) -> dict[str, Any]:
        with self._on_stream():
            inputs = [self._to_torch(feeds[t.name]) for t in self.spec.inputs]
            result = self.module(*inputs)
            outputs = result if isinstance(result, tuple) else (result,)
            return {t.name: self._from_torch(o) for t, o in zip(self.spec.outputs, outputs)}
