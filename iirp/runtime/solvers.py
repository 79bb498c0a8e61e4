"""Flow solvers: what turns a model-grid image pair into a flow, behind one interface.

Engines (``--engine``):

* ``reference``: the PyTorch reference loop (:func:`iirp.model.register_arrays`), the readable
  oracle every engine is tested against; CPU or CUDA. The default with ``--checkpoint``.
* ``torch``, ``ort``, ``openvino``, ``trt``: the one pipeline (:class:`~iirp.runtime.pipeline.EngineSolver`)
  with that stage backend, on the placement of ``--device`` (numpy + numba kernels on the CPU,
  CuPy + CUDA kernels on a GPU). ``torch`` also runs straight from a checkpoint; the others read
  an ``iirp-export`` folder (``ort`` is the default with ``--engines``).

Every solver carries the model's :class:`~iirp.manifest.ModelContract` (grid size, spacing,
orientation, intensity rule): a manifest's, or what a checkpoint records. This module imports
:mod:`iirp.model` only when a solver that needs torch is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np

from iirp.devices import parse_device
from iirp.errors import IirpError
from iirp.iterstop import IterStopRule, IterStopTrace
from iirp.manifest import Manifest, ModelContract
from iirp.runtime.engines.options import BackendOptionError, BackendOptions
from iirp.typing import PathLike

__all__ = [
    "ENGINES",
    "FlowSolver",
    "ReferenceSolver",
    "TorchSolver",
    "check_request",
    "checkpoint_manifest",
    "default_device",
    "default_engine",
    "make_solver",
]

#: Every ``--engine`` name.
ENGINES = ("reference", "torch", "ort", "openvino", "trt")
#: Engines that run straight from a checkpoint (the others need an ``iirp-export`` folder).
CHECKPOINT_ENGINES = ("reference", "torch")


class FlowSolver(Protocol):
    """Computes the IIRP flow of a pair already on the model grid.

    Attributes:
        engine: ``reference``, ``torch``, ``ort``, ``openvino`` or ``trt``.
        device: ``cpu`` or ``cuda:N``.
        precision: what the network computes in.
        contract: the model grid and intensity rule the model expects.
        model_size: ``contract.size``.
        source: checkpoint or engine folder it came from.
        source_sha256: hash of that checkpoint.
    """

    engine: str
    device: str
    precision: str
    contract: ModelContract
    source: str
    source_sha256: str

    @property
    def model_size(self) -> tuple[int, int, int]: ...

    def solve(self, moving: np.ndarray, fixed: np.ndarray, rule: IterStopRule) -> IterStopTrace[np.ndarray]:
        """``(X, Y, Z)`` float32 volumes in [0, 1] -> trace with a ``(3, X, Y, Z)`` voxel flow."""
        ...


def _checkpoint_contract(info: Any, size: Optional[tuple[int, int, int]] = None) -> ModelContract:
    """What a checkpoint records of its grid (1 mm, RAS, minmax where it records nothing)."""
    return ModelContract(
        tuple(size or info.size),  # type: ignore[arg-type]
        info.spacing or (1.0, 1.0, 1.0),
        info.orientation or "RAS",
        info.intensity or "minmax",
        recorded=info.spacing is not None,
    )


class ReferenceSolver:
    """The PyTorch reference (:func:`iirp.model.register_arrays`) as a solver: the oracle, in fp32.

    Args:
        checkpoint: an RP-Net checkpoint.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        options: ``threads`` sets torch's (process-wide); ``precision`` must be ``auto`` or ``fp32``.
        contract: the model grid (default: what the checkpoint records).

    Raises:
        CheckpointError: the checkpoint cannot be loaded.
        IirpError: torch is missing or the CUDA device is not available.
    """

    engine = "reference"
    precision = "fp32"

    def __init__(self, checkpoint: PathLike, device: str = "cpu", options: Optional[BackendOptions] = None,
                 contract: Optional[ModelContract] = None) -> None:
        torch = _torch("reference")
        dev = parse_device(device)
        if dev.is_cuda and (not torch.cuda.is_available() or dev.index >= torch.cuda.device_count()):
            raise IirpError(f"device {dev} requested but torch sees {torch.cuda.device_count()} CUDA device(s)")
        self.options = options or BackendOptions()
        if self.options.precision not in ("auto", "fp32"):
            raise BackendOptionError(f"--precision {self.options.precision} is for engine 'openvino'; the PyTorch "
                                     "reference computes in fp32")
        if self.options.threads is not None:
            torch.set_num_threads(self.options.threads)  # process-wide
        from iirp.model import load_checkpoint

        self.net, self.info = load_checkpoint(checkpoint, size=contract.size if contract is not None else None)
        self.device = str(dev)
        self.contract = contract or _checkpoint_contract(self.info)
        self.source = self.info.path
        self.source_sha256 = self.info.sha256

    @property
    def model_size(self) -> tuple[int, int, int]:
        return self.contract.size

    def solve(self, moving: np.ndarray, fixed: np.ndarray, rule: IterStopRule) -> IterStopTrace[np.ndarray]:
        from iirp.model import register_arrays

        return register_arrays(self.net, moving, fixed, rule, device=self.device)

    @property
    def backend_report(self) -> dict[str, Any]:
        """Threads and the backend of every stage (all PyTorch), as :class:`EngineSolver` reports them."""
        from iirp.manifest import STAGES

        return {"precision_note": None, "threads": self.options.threads, "load_ms": None,
                "stage_backends": {stage: f"torch-{self.precision}" for stage in STAGES}}


class TorchSolver(ReferenceSolver):
    """The reference under the name it had before the pipeline was unified: reports engine ``torch``.

    For library users and reports that key on that name; ``iirp-run`` names the reference engine
    ``reference`` (:func:`make_solver`).
    """

    engine = "torch"


def _torch(engine: str) -> Any:
    try:
        import torch
    except ImportError as err:
        raise IirpError(f"engine {engine!r} needs PyTorch: pip install torch") from err
    return torch


def checkpoint_manifest(checkpoint: PathLike, precision: str = "fp32",
                        size: Optional[tuple[int, int, int]] = None) -> tuple[Manifest, ModelContract]:
    """A manifest for the ``torch`` stages of a checkpoint (no export folder) and the checkpoint's contract.

    Its stages have the exported stages' contract (:func:`iirp.export.stages.stage_io`) but no files;
    ``precision`` (``fp32``, or ``fp16`` on CUDA) is what the torch stages compute in; ``size`` a model grid
    other than the checkpoint's (multiples of 8).

    Raises:
        CheckpointError: the checkpoint cannot be loaded.
    """
    _torch("torch")
    from iirp.export.stages import stage_io
    from iirp.manifest import StageSpec
    from iirp.model import load_checkpoint
    from iirp.model.rpnet import level_channels

    _, info = load_checkpoint(checkpoint, size=size)
    contract = _checkpoint_contract(info)
    io = stage_io(level_channels(info.first_channel)[0], info.size)
    manifest = Manifest(
        source_sha256=info.sha256, model={"first_channel": info.first_channel, "n_resblocks": info.n_resblocks},
        model_grid={"size": list(info.size), "spacing": list(contract.spacing), "orientation": contract.orientation},
        precision=precision, opset=0, dynamic=False,
        stages={name: StageSpec(file="", sha256="", inputs=i, outputs=o) for name, (i, o) in io.items()},
        intensity=contract.intensity, source_path=str(Path(info.path).absolute()),
    )
    return manifest, contract


def default_engine(checkpoint: Optional[PathLike], engines: Optional[PathLike]) -> str:
    """``reference`` with a checkpoint, ``ort`` with an engine folder."""
    return "ort" if engines is not None else "reference"


def fastest_cpu_engine() -> str:
    """The fastest exact CPU engine installed: ``openvino`` (each stage on OpenVINO, or on onnxruntime where that
    was measured more than 10 % faster on this machine; bf16 only where the CPU computes it natively and the
    export's gate allows), else ``ort``."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "ort"
    return "openvino"


def default_device(engine: str) -> str:
    """``cuda`` for ``trt`` (it runs nowhere else), ``cpu`` for every other engine."""
    return "cuda" if engine == "trt" else "cpu"


def check_request(
    engine: str, *, checkpoint: PathLike | None = None, engines: PathLike | None = None, device: str = "cpu"
) -> None:
    """The cheap checks of :func:`make_solver` (no model is loaded): one source, a known engine, a device that exists.

    Raises:
        IirpError: neither or both sources, an unknown engine, an engine that needs ``--engines``, a CUDA
            device that is not there (``CudaUnavailableError``).
        DeviceError: a malformed device.
    """
    if (checkpoint is None) == (engines is None):
        raise IirpError("give exactly one of --checkpoint CKPT or --engines DIR")
    dev = parse_device(device)
    if engines is None and engine not in CHECKPOINT_ENGINES:
        raise IirpError(f"engine {engine!r} needs --engines DIR (an iirp-export folder); with --checkpoint use "
                        f"{' or '.join(CHECKPOINT_ENGINES)}")
    if engine not in ENGINES:
        raise IirpError(f"engine {engine!r} is not available; choose from {', '.join(ENGINES)}")
    if engine == "trt" and engines is not None:  # the folder's own problem first: no engines at all
        manifest = Manifest.load(Path(str(engines)))
        if not manifest.tensorrt or any(s.engine_file is None for s in manifest.stages.values()):
            from iirp.manifest import ManifestMismatchError

            raise ManifestMismatchError(f"engine folder {engines} has no TensorRT engines (export with --trt)")
    if engine != "reference":
        from iirp.runtime.engines import BACKENDS

        kinds = BACKENDS[engine].device_kinds  # type: ignore[attr-defined]
        if dev.kind not in kinds:
            where = "the CPU" if kinds == ("cpu",) else "a CUDA GPU (--device cuda)"
            raise IirpError(f"engine {engine!r} runs on {where}, not on {dev}")
    if dev.is_cuda:  # a missing GPU is one line before the images or the model are read
        if engine == "reference":
            torch = _torch(engine)
            if not torch.cuda.is_available() or dev.index >= torch.cuda.device_count():
                raise IirpError(f"device {dev} requested but torch sees {torch.cuda.device_count()} CUDA device(s)")
        else:
            from iirp.runtime.placement import check_cuda_device

            check_cuda_device(dev)


def make_solver(
    engine: str, *, checkpoint: PathLike | None = None, engines: PathLike | None = None, device: str = "cpu",
    options: Optional[BackendOptions] = None,
) -> FlowSolver:
    """Build a solver (see the module docstring for the engines).

    Args:
        engine: one of :data:`ENGINES`.
        checkpoint: an RP-Net checkpoint (``reference`` and ``torch``).
        engines: an ``iirp-export`` folder (every engine; ``reference`` and ``torch`` use its source checkpoint).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        options: precision, threads and cache folder.

    Raises:
        IirpError: see :func:`check_request`; or the solver cannot be built (missing library or GPU,
            ``BackendOptionError`` for a precision the engine does not compute).
    """
    check_request(engine, checkpoint=checkpoint, engines=engines, device=device)
    options = options or BackendOptions()
    if options.precision == "bf16" and engine != "openvino":
        raise BackendOptionError(f"--precision bf16 needs --engine openvino, got engine {engine!r}")
    from iirp.runtime.pipeline import EngineSolver

    if engine == "reference":
        if checkpoint is not None:
            return ReferenceSolver(checkpoint, device, options)
        manifest = Manifest.load(Path(str(engines)))
        return ReferenceSolver(manifest.source_checkpoint(), device, options, contract=manifest.contract)
    if engines is not None:
        return EngineSolver(engines, engine, device, options)
    assert checkpoint is not None
    return EngineSolver.from_checkpoint(checkpoint, device, options)
