"""How to build a flow solver, as one small picklable value (cohort workers build their own).

:class:`SolverSpec` is what ``iirp-run`` knows about the solver before it loads anything: the
engine, the source (a checkpoint or an ``iirp-export`` folder), the device, a thread bound and the precision.
The command line builds it once; the local cohort and single-pair modes call :meth:`SolverSpec.build`
in the process, and every Ray worker receives the same value and builds its own solver once
(:mod:`iirp.runtime.cluster`). Solver construction lives here and in :func:`make_solver`, nowhere else.

Devices: ``cpu``, ``cuda`` or ``cuda:N`` on this machine. Inside a Ray worker that was given GPUs,
Ray has already narrowed ``CUDA_VISIBLE_DEVICES`` to them, so ``cuda`` means the worker's first
visible device, ``cuda:0`` (:meth:`SolverSpec.in_worker`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from iirp.errors import IirpError
from iirp.manifest import Manifest, ModelContract
from iirp.runtime.engines.options import BackendOptionError, BackendOptions
from iirp.runtime.solvers import FlowSolver
from iirp.typing import PathLike

__all__ = ["SolverSpec"]


@dataclass(frozen=True)
class SolverSpec:
    """Everything :func:`~iirp.runtime.solvers.make_solver` needs, as plain values.

    Attributes:
        engine: ``reference``, ``torch``, ``ort``, ``openvino`` or ``trt``.
        checkpoint: an RP-Net checkpoint (``--checkpoint``), or None.
        engines: an ``iirp-export`` folder (``--engines``), or None.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        threads: CPU threads the solver may use (numba kernels, onnxruntime and OpenVINO intra-op,
            torch), or None for the libraries' defaults (every core).
        precision: ``--precision`` (:class:`~iirp.runtime.engines.options.BackendOptions`).
        slabs: ``--slabs``: the finest flow estimator in this many slabs (engine ``openvino``; 1: whole).
        low_memory: ``--low-memory`` (engines ``ort`` and ``openvino``).
    """

    engine: str
    checkpoint: Optional[str] = None
    engines: Optional[str] = None
    device: str = "cpu"
    threads: Optional[int] = None
    precision: str = "auto"
    slabs: int = 1
    low_memory: bool = False

    @classmethod
    def of(cls, engine: Optional[str], *, checkpoint: Optional[PathLike] = None, engines: Optional[PathLike] = None,
           device: Optional[str] = None, threads: Optional[int] = None, precision: str = "auto",
           slabs: int = 1, low_memory: bool = False) -> "SolverSpec":
        """A spec from command-line values, with ``iirp-run``'s defaults for the engine and the device."""
        from iirp.runtime.solvers import default_device, default_engine

        name = engine or default_engine(checkpoint, engines)
        return cls(name, _str(checkpoint), _str(engines), device or default_device(name), threads, precision, slabs,
                   low_memory)

    def options(self) -> BackendOptions:
        """The backend options of this spec (checked: a bad precision, thread or slab count is one clear error).

        Raises:
            BackendOptionError: a malformed value, ``slabs`` > 1 for another engine than ``openvino``, or
                ``low_memory`` for another engine than ``ort`` and ``openvino`` on the CPU.
        """
        options = BackendOptions(precision=self.precision, threads=self.threads, slabs=self.slabs,
                                 low_memory=self.low_memory)
        if options.slabs > 1 and self.engine != "openvino":
            raise BackendOptionError(f"--slabs is for engine 'openvino' (it runs the finest flow estimator in slabs); "
                                     f"engine {self.engine!r} runs it whole")
        if options.low_memory and (self.engine not in ("ort", "openvino") or self.device != "cpu"):
            raise BackendOptionError(f"--low-memory is for engines 'ort' and 'openvino' on the CPU, got engine "
                                     f"{self.engine!r} on {self.device}")
        return options

    def for_workers(self, threads: Optional[int]) -> "SolverSpec":
        """This spec with absolute paths (a worker's working folder is not the caller's) and ``threads``."""
        def _abs(p: Optional[str]) -> Optional[str]:
            return None if p is None else os.path.abspath(p)

        return dataclasses.replace(self, checkpoint=_abs(self.checkpoint), engines=_abs(self.engines), threads=threads)

    def check(self, *, here: bool = True) -> None:
        """The cheap checks of :func:`make_solver` (nothing is loaded).

        Args:
            here: the solver will be built on this machine, so a CUDA device must exist here; with
                False (Ray workers elsewhere) only the request itself is checked.

        Raises:
            IirpError: see :func:`~iirp.runtime.solvers.check_request`.
        """
        from iirp.devices import parse_device
        from iirp.runtime.solvers import check_request

        self.options()
        if here:
            check_request(self.engine, checkpoint=self.checkpoint, engines=self.engines, device=self.device)
            return
        parse_device(self.device)
        check_request(self.engine, checkpoint=self.checkpoint, engines=self.engines, device="cpu"
                      if self.engine != "trt" else self.device)

    def contract(self) -> ModelContract:
        """The model's contract (grid, intensity rule) from the manifest or the checkpoint, without building a solver.

        Raises:
            IirpError: the manifest or checkpoint cannot be read.
        """
        if self.engines is not None:
            return Manifest.load(Path(self.engines)).contract
        from iirp.model import load_checkpoint
        from iirp.runtime.solvers import _checkpoint_contract

        _, info = load_checkpoint(str(self.checkpoint))
        return _checkpoint_contract(info)

    def source_sha256(self) -> Optional[str]:
        """The model's sha256 as ``report.json`` records it (``source_sha256``): the checkpoint's, or the one an
        export folder's manifest names; None when it cannot be read here (the solver will say why)."""
        from iirp.manifest import Manifest, sha256_file

        try:
            if self.engines is not None:
                return Manifest.load(Path(self.engines)).source_sha256
            return sha256_file(self.checkpoint) if self.checkpoint is not None else None
        except (OSError, IirpError):
            return None

    def in_worker(self, gpu_ids: Sequence[object]) -> "SolverSpec":
        """This spec as a Ray worker that was given ``gpu_ids`` (``ray.get_gpu_ids()``) must build it.

        ``cuda`` becomes ``cuda:0``: Ray sets ``CUDA_VISIBLE_DEVICES`` to the worker's own GPUs, so its
        first one is device 0 whatever its physical number.

        Raises:
            IirpError: a CUDA device without a GPU from Ray, or an explicit ``cuda:N`` (Ray chooses).
        """
        if self.device == "cpu":
            return self
        if self.device != "cuda":
            raise IirpError(f"device {self.device!r} with Ray: Ray chooses each worker's GPU; use --device cuda")
        if not gpu_ids:
            raise IirpError("device 'cuda' with Ray needs GPUs per worker (--gpus-per-worker G > 0)")
        return dataclasses.replace(self, device="cuda:0")

    def build(self) -> FlowSolver:
        """Build the solver (:func:`make_solver`) with this spec's backend options (threads, precision).

        Raises:
            IirpError: see :func:`~iirp.runtime.solvers.make_solver`.
        """
        from iirp.runtime.solvers import make_solver

        return make_solver(self.engine, checkpoint=self.checkpoint, engines=self.engines, device=self.device,
                           options=self.options())


def _str(path: Optional[PathLike]) -> Optional[str]:
    return None if path is None else os.fspath(path)
