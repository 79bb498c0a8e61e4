"""Flow solvers: what turns a model-grid image pair into a flow, behind one interface.

A solver is selected by engine name. This module holds the registry and the
PyTorch reference solver (``torch``), which imports :mod:`iirp.model` only when
it is built, so the rest of the runtime never needs torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np

from iirp.errors import IirpError
from iirp.iterstop import IterStopRule, IterStopTrace
from iirp.runtime.engines.options import BackendOptionError, BackendOptions
from iirp.typing import PathLike

__all__ = ["FlowSolver", "TorchSolver", "make_solver", "SOLVERS"]


class FlowSolver(Protocol):
    """Computes the IIRP flow of a pair already on the model grid.

    Attributes:
        engine: registered name (``torch``, ``ort``, ``trt``).
        device: ``cpu`` or ``cuda[:N]``.
        model_size: model grid ``(X, Y, Z)`` in voxels.
        source: checkpoint or engine folder it came from.
        source_sha256: hash of that source.
    """

    engine: str
    device: str
    model_size: tuple[int, int, int]
    source: str
    source_sha256: str

    def solve(self, moving: np.ndarray, fixed: np.ndarray, rule: IterStopRule) -> IterStopTrace[np.ndarray]:
        """``(X, Y, Z)`` float32 volumes in [0, 1] -> trace with a ``(3, X, Y, Z)`` voxel flow."""
        ...


class TorchSolver:
    """The PyTorch reference (:func:`iirp.model.register_arrays`) as a solver.

    Raises:
        CheckpointError: the checkpoint cannot be loaded.
        IirpError: torch is missing or the CUDA device is not available.
    """

    engine = "torch"
    precision = "fp32"

    def __init__(self, checkpoint: PathLike, device: str = "cpu", options: Optional[BackendOptions] = None) -> None:
        try:
            import torch

            from iirp.model import load_checkpoint
        except ImportError as err:
            raise IirpError("engine 'torch' needs PyTorch: pip install torch") from err
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise IirpError(f"device {device!r} requested but torch sees no CUDA device")
        if not (device == "cpu" or device.startswith("cuda")):
            raise IirpError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
        self.options = options or BackendOptions()
        if self.options.precision not in ("auto", "fp32"):
            raise BackendOptionError(f"--precision {self.options.precision} is for engine 'openvino'; the PyTorch "
                                     "reference computes in fp32")
        if self.options.threads is not None:
            torch.set_num_threads(self.options.threads)  # process-wide
        self.net, self.info = load_checkpoint(checkpoint)
        self.device = device
        self.model_size = self.info.size
        self.source = self.info.path
        self.source_sha256 = self.info.sha256

    def solve(self, moving: np.ndarray, fixed: np.ndarray, rule: IterStopRule) -> IterStopTrace[np.ndarray]:
        from iirp.model import register_arrays

        return register_arrays(self.net, moving, fixed, rule, device=self.device)

    @property
    def backend_report(self) -> dict[str, Any]:
        """Threads and the backend of every stage (all PyTorch), as :class:`EngineSolver` reports them."""
        from iirp.manifest import STAGES

        return {"precision_note": None, "threads": self.options.threads, "load_ms": None,
                "stage_backends": {stage: f"torch-{self.precision}" for stage in STAGES}}


#: Engine name -> factory ``(checkpoint, device, options) -> FlowSolver`` for ``--checkpoint`` runs.
SOLVERS: dict[str, Callable[[PathLike, str, Optional[BackendOptions]], FlowSolver]] = {"torch": TorchSolver}


def check_request(
    engine: str, *, checkpoint: PathLike | None = None, engines: PathLike | None = None, device: str = "cpu"
) -> None:
    """The cheap checks of :func:`make_solver` (nothing is loaded): one source, a known device that exists.

    Raises:
        IirpError: neither or both sources, a malformed device, an engine that needs ``--engines``, or a
            CUDA device that is not there.
    """
    if (checkpoint is None) == (engines is None):
        raise IirpError("give exactly one of --checkpoint CKPT or --engines DIR")
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise IirpError(f"make_solver(): device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if engines is None and engine not in SOLVERS and device == "cpu":
        raise IirpError(f"engine {engine!r} needs --engines DIR (an iirp-export folder); with --checkpoint use torch")
    if device != "cpu" and engine == "torch":
        from iirp.runtime.gpu_pipeline import cuda_device

        cuda_device("make_solver()", device)


def make_solver(
    engine: str, *, checkpoint: PathLike | None = None, engines: PathLike | None = None, device: str = "cpu",
    options: Optional[BackendOptions] = None,
) -> FlowSolver:
    """Build a solver: the PyTorch reference from a checkpoint, or ``engine`` over an exported folder.

    Args:
        engine: ``torch`` (reference loop with a checkpoint; the torch stages with ``engines``; on
            ``cuda`` both run the GPU pipeline, :mod:`iirp.runtime.gpu_pipeline`), ``ort`` or ``trt``
            (need ``engines``; their pipeline stays on the host).
        checkpoint: an RP-Net checkpoint, for ``--checkpoint`` runs.
        engines: an ``iirp-export`` folder, for ``--engines`` runs.
        device: ``cpu`` or ``cuda[:N]``.
        options: precision (``openvino`` only, besides the folder's own), threads, cache folder.

    Raises:
        IirpError: neither or both sources, unknown engine or device, or the solver cannot be built
            (``CudaUnavailableError`` when ``cuda`` is asked for and there is no device;
            ``BackendOptionError`` for a precision the engine does not compute).
    """
    check_request(engine, checkpoint=checkpoint, engines=engines, device=device)
    options = options or BackendOptions()
    if options.precision == "bf16" and engine != "openvino":
        raise BackendOptionError(f"--precision bf16 needs --engine openvino, got engine {engine!r}")
    if device != "cpu" and engine == "torch":
        return _cuda_solver(checkpoint, engines, device)
    if engines is not None:
        from iirp.runtime.pipeline import EngineSolver

        return EngineSolver(engines, engine, device, options)
    if engine not in SOLVERS:
        raise IirpError(f"engine {engine!r} needs --engines DIR (an iirp-export folder); with --checkpoint use torch")
    assert checkpoint is not None
    return SOLVERS[engine](checkpoint, device, options)


def _cuda_solver(checkpoint: PathLike | None, engines: PathLike | None, device: str) -> FlowSolver:
    """The GPU pipeline (:class:`~iirp.runtime.gpu_pipeline.CudaSolver`) with the cuDNN engine.

    With ``engines``, the network is the folder's source checkpoint (sha256 checked) in the
    folder's precision on its model grid; with ``checkpoint``, that checkpoint in fp32.
    """
    from iirp.runtime.gpu_pipeline import CudaSolver, cuda_device

    cuda_device("make_solver()", device)  # a missing GPU is one line, before anything is loaded
    if engines is None:
        assert checkpoint is not None
        return CudaSolver(checkpoint, device)
    from iirp.manifest import Manifest, ManifestMismatchError, sha256_file

    manifest = Manifest.load(Path(os.fspath(engines)))
    source = manifest.source_path
    if not source or not os.path.isfile(source):
        raise ManifestMismatchError(f"engine 'torch' needs the source checkpoint {source!r}, which is missing")
    if sha256_file(source) != manifest.source_sha256:
        raise ManifestMismatchError(
            f"checkpoint {source} is not the one the engines were exported from (sha256 differs)"
        )
    return CudaSolver(source, device, precision=manifest.precision, size=manifest.size)
