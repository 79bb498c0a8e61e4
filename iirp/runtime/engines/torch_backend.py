"""The PyTorch reference behind the backend interface (engine ``torch``).

Built from the checkpoint the engine folder was exported from (its path and
sha256 are in the manifest), so every engine can be compared stage by stage
with the reference. Imports torch and :mod:`iirp.model` only when entered.
"""

from __future__ import annotations

import os

import numpy as np

from iirp.errors import IirpError
from iirp.manifest import ManifestMismatchError, sha256_file
from iirp.runtime.engines.base import Backend, register_backend

__all__ = ["TorchBackend"]


@register_backend("torch")
class TorchBackend(Backend):
    """One stage run by the PyTorch modules of :class:`iirp.model.RPNet` (fp32)."""

    def _activate(self) -> None:
        try:
            import torch

            from iirp.model import load_checkpoint
        except ImportError as err:
            raise IirpError("engine 'torch' needs PyTorch: pip install torch") from err
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise IirpError(f"device {self.device!r} requested but torch sees no CUDA device")
        if self.options.threads is not None:
            torch.set_num_threads(self.options.threads)  # process-wide, like every torch setting
        source = self.manifest.source_path
        if not source or not os.path.isfile(source):
            raise ManifestMismatchError(f"engine 'torch' needs the source checkpoint {source!r}, which is missing")
        if sha256_file(source) != self.manifest.source_sha256:
            raise ManifestMismatchError(
                f"checkpoint {source} is not the one the engines were exported from (sha256 differs)"
            )
        net, _ = load_checkpoint(source, size=self.manifest.size)
        net = net.to(self.device).to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        self.torch = torch
        if self.name == "feature_extractor":
            self.module = net.encoder
        else:
            self.module = net.estimator(int(self.name.rsplit("_", 1)[1]))

    def _release(self) -> None:
        self.__dict__.pop("module", None)

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        fmt = torch.channels_last_3d
        inputs = [
            torch.from_numpy(feeds[t.name]).to(self.device).contiguous(memory_format=fmt) for t in self.spec.inputs
        ]
        with torch.inference_mode():
            result = self.module(*inputs)
        outputs = result if isinstance(result, tuple) else (result,)
        return {t.name: o.float().cpu().contiguous().numpy() for t, o in zip(self.spec.outputs, outputs)}
