"""How to build a flow solver, as one small picklable value (cohort workers build their own).

:class:`SolverSpec` is what ``iirp-run`` knows about the solver before it loads anything: the
engine, the source (a checkpoint or an ``iirp-export`` folder), the device and a thread bound.
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
from iirp.runtime.solvers import FlowSolver
from iirp.typing import PathLike

__all__ = ["SolverSpec", "limit_threads"]


@dataclass(frozen=True)
class SolverSpec:
    """Everything :func:`~iirp.runtime.solvers.make_solver` needs, plus a thread bound.

    Attributes:
        engine: ``torch``, ``ort`` or ``trt``.
        checkpoint: an RP-Net checkpoint (``--checkpoint``), or None.
        engines: an ``iirp-export`` folder (``--engines``), or None.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        threads: CPU threads the solver may use (numba kernels, onnxruntime intra-op, torch), or None
            for the libraries' defaults.
    """

    engine: str
    checkpoint: Optional[str] = None
    engines: Optional[str] = None
    device: str = "cpu"
    threads: Optional[int] = None

    @classmethod
    def of(cls, engine: Optional[str], *, checkpoint: Optional[PathLike] = None, engines: Optional[PathLike] = None,
           device: str = "cpu", threads: Optional[int] = None) -> "SolverSpec":
        """A spec from command-line values; ``engine`` defaults to ``ort`` with ``engines``, else ``torch``."""
        def _str(p: Optional[PathLike]) -> Optional[str]:
            return None if p is None else os.fspath(p)

        name = engine or ("ort" if engines is not None else "torch")
        return cls(name, _str(checkpoint), _str(engines), device, threads)

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
        from iirp.runtime.solvers import check_request

        if here:
            check_request(self.engine, checkpoint=self.checkpoint, engines=self.engines, device=self.device)
            return
        check_request(self.engine, checkpoint=self.checkpoint, engines=self.engines, device="cpu")
        if not (self.device in ("cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise IirpError(f"make_solver(): device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

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
        """Bound the threads (when ``threads`` is set) and build the solver (:func:`make_solver`).

        Raises:
            IirpError: see :func:`~iirp.runtime.solvers.make_solver`.
        """
        from iirp.runtime.solvers import make_solver

        if self.threads is not None:
            limit_threads(self.threads, torch=self.engine == "torch")
        return make_solver(self.engine, checkpoint=self.checkpoint, engines=self.engines, device=self.device)


def limit_threads(threads: int, *, torch: bool = False) -> None:
    """Bound this process's compute threads: numba's kernels (for the calling thread), onnxruntime
    sessions built from now on (intra-op pool) and, with ``torch``, torch's intra-op pool.

    Interim: the engine layer will take thread counts as a backend option; until then onnxruntime's
    bound is :attr:`~iirp.runtime.engines.ort.OrtBackend.intra_op_threads`, a process-wide default.
    """
    import numba

    from iirp.runtime.engines.ort import OrtBackend

    n = max(1, int(threads))
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    OrtBackend.intra_op_threads = n
    if torch:
        import torch as _torch

        _torch.set_num_threads(n)
