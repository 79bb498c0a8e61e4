"""The one IterStop pipeline: network stages + a kernel set + a placement, for every engine and device.

A solver (:class:`EngineSolver`) is three parts:

* a stage backend per stage (:mod:`iirp.runtime.engines`: onnxruntime CPU or CUDA, OpenVINO,
  TensorRT, torch on oneDNN or cuDNN), all behind one ``infer`` contract;
* a kernel set with the same function names on host arrays (numba, :mod:`iirp.kernels`) and on
  device arrays (CUDA, :mod:`iirp.kernels.cuda_ops`): warp, compose, upsample2, fused score;
* a placement (:mod:`iirp.runtime.placement`): where the arrays live and which stream runs.

:class:`EngineLevelOps` is the only :class:`iirp.iterstop.LevelOps` over network stages (the
PyTorch reference loop in :mod:`iirp.model.reference` stays the readable oracle). The stopping
rules come from :func:`iirp.iterstop.run_iterstop`. The two volumes go up once, the flow comes
down once; on a GPU the IterStop score is the only synchronisation per pass.

Arrays are batch-free float32 of the placement: volumes ``(X, Y, Z)``, features ``(C, x, y, z)``,
flows ``(3, x, y, z)`` in voxels of their level (see :mod:`iirp.runtime.geometry`).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from iirp.errors import IirpError
from iirp.iterstop import IterStopRule, IterStopTrace, run_iterstop
from iirp.manifest import Manifest, ModelContract, estimator_stage
from iirp.runtime.engines import BACKENDS, StageSet
from iirp.runtime.engines.options import BackendOptionError, BackendOptions
from iirp.runtime.placement import HOST, Clock, Placement, make_placement
from iirp.runtime.slabs import WarpedInput
from iirp.typing import PathLike

__all__ = ["EngineLevelOps", "EngineSolver", "register_arrays_with_engines", "set_kernel_threads"]


class EngineLevelOps:
    """:class:`iirp.iterstop.LevelOps` over entered stages, on their placement, with its kernel set.

    Args:
        stages: an entered :class:`~iirp.runtime.engines.StageSet`; its placement is used for everything.
        moving, fixed: ``(X, Y, Z)`` float32 volumes in [0, 1] on the model grid, already on the placement
            (:meth:`~iirp.runtime.placement.Placement.upload`).
        clock: per-stage clock (``features``, ``estimator_K``, ``kernels``, ``score``).

    Every method queues its work on the placement's stream and returns without synchronizing,
    except :meth:`score` (a host float).
    """

    def __init__(self, stages: StageSet, moving: Any, fixed: Any, clock: Optional[Clock] = None) -> None:
        self.stages = stages
        self.placement: Placement = stages.placement
        self.kernels = self.placement.kernels
        self.moving = moving
        self.fixed = fixed
        self.clock = clock or self.placement.clock()
        self._du_is_borrowed = False  # the last du lives in a stage's reused output buffer
        t0 = self.clock.start()
        batch = self.placement.stack([fixed, moving])[:, None]  # (2, 1, X, Y, Z): fixed, moving
        out = stages["feature_extractor"].infer({"image": batch})
        # views of the stage's outputs: valid for this registration (the feature extractor runs once)
        self.fixed_features = [out[f"f{k}"][0] for k in (1, 2, 3, 4)]
        self.moving_features = [out[f"f{k}"][1] for k in (1, 2, 3, 4)]
        stages["feature_extractor"].trim()  # its working memory; the features stay
        self.clock.stop("features", t0)

    def zero_flow(self, level: int) -> Any:
        return self.placement.zeros((3, *self.moving_features[level - 1].shape[1:]))

    def estimate(self, level: int, flow: Optional[Any]) -> Any:
        """``du`` of one pass at ``level``: the estimator on the fixed features and the moving ones warped by
        ``flow``. A stage run in slabs on the host warps them slab by slab itself (:class:`WarpedInput`: the
        whole warped features, 157 MB at full size, never exist; that warp is then timed with the stage)."""
        stage = self.stages[estimator_stage(level)]
        moving = self.moving_features[level - 1]
        feed: Any = moving[None]
        if flow is not None and self.placement.is_host and stage.takes_warped_input:
            feed = WarpedInput(moving, flow)
        elif flow is not None:
            t0 = self.clock.start()
            feed = self.kernels.warp(moving, flow)[None]
            if level == 1:  # the finest estimator is the memory peak: free the warp's scratch (157 MB at full size)
                _release_scratch(self.placement)
            self.clock.stop("kernels", t0)
        t0 = self.clock.start()
        du = stage.infer({"moving_features": feed, "fixed_features": self.fixed_features[level - 1][None]})
        self.clock.stop(f"estimator_{level}", t0)
        du = du["flow"][0]
        # a stage that reuses its output buffers overwrites du on its next call; keep a copy where du is the flow
        self._du_is_borrowed = stage.reuses_outputs
        return du

    def compose(self, flow: Optional[Any], du: Any) -> Any:
        if flow is None:  # the first pass at level 4: du becomes the flow
            return self.placement.copy(du) if self._du_is_borrowed else du
        t0 = self.clock.start()
        out = self.kernels.compose(flow, du)
        self.clock.stop("kernels", t0)
        return out

    def upsample(self, flow: Any, level: int) -> Any:
        self.stages[estimator_stage(level)].trim()  # done with this level's estimator for this pair
        t0 = self.clock.start()
        out = self.kernels.upsample2(flow)  # vectors doubled with the grid
        self.clock.stop("kernels", t0)
        return out

    def score(self, level: int, flow: Any) -> float:
        t0 = self.clock.start()
        value = self.kernels.fused_ncc_score(self.moving, self.fixed, flow, 2 ** (level - 1))  # synchronizes
        self.clock.stop("score", t0)
        return value


def register_arrays_with_engines(
    stages: StageSet, moving: np.ndarray, fixed: np.ndarray, rule: IterStopRule
) -> IterStopTrace[np.ndarray]:
    """Run IIRP over entered ``stages`` on their placement.

    Args:
        moving, fixed: ``(X, Y, Z)`` float32 host volumes in [0, 1] on the model grid.

    Returns:
        The trace; ``flow`` is a ``(3, X, Y, Z)`` float32 host array (voxels). ``timings_ms`` holds the
        per-stage totals (``upload``, ``features``, ``estimator_K``, ``kernels``, ``score``,
        ``download``) and ``iirp``, the whole registration.
    """
    placement = stages.placement
    clock = placement.clock()
    start = clock.start()
    m, f = placement.upload(moving), placement.upload(fixed)  # the one upload
    clock.stop("upload", start)
    try:
        trace = run_iterstop(EngineLevelOps(stages, m, f, clock), rule)
    finally:
        stages.trim()  # no stage's working memory outlives the registration
        _release_scratch(placement)  # nor the kernels' scratch
    t0 = clock.start()
    flow = placement.download(trace.flow)  # the one download (synchronizes)
    clock.stop("download", t0)
    clock.stop("iirp", start)
    trace.flow = np.ascontiguousarray(flow, dtype=np.float32)
    trace.timings_ms = clock.totals()
    return trace


def _release_scratch(placement: Placement) -> None:
    """Free the scratch arrays the placement's kernels keep between calls (where they keep any)."""
    release = getattr(placement.kernels, "release_scratch", None)
    if release is not None:
        release()


class EngineSolver:
    """A :class:`~iirp.runtime.solvers.FlowSolver`: stages of ``engine`` on the placement of ``device``.

    The model comes from an ``iirp-export`` folder, or (engine ``torch`` only, :meth:`from_checkpoint`)
    straight from a checkpoint. The manifest is checked when the solver is built: file hashes
    (ONNX, or the TensorRT engines for ``trt``), the precision (resolved here for ``openvino``,
    :func:`~iirp.runtime.engines.openvino.select_precision`), and the engine's own checks (GPU
    and TensorRT version) when its stages are loaded (:meth:`load`, or the first :meth:`solve`,
    whose trace then carries the load time as ``timings_ms["load"]``).

    Args:
        folder: an ``iirp-export`` folder.
        engine: registered backend name (``ort``, ``openvino``, ``trt``, ``torch``).
        device: ``cpu``, ``cuda`` or ``cuda:N`` (the placement: numpy + numba, or CuPy + CUDA kernels).
        options: precision, threads and cache folder (:class:`BackendOptions`).

    Attributes:
        precision: what the stages compute in (``fp32``, ``fp16``, ``bf16``).
        precision_note: why ``auto`` chose that precision, or None.
        contract: the model grid and intensity rule the model expects.

    Raises:
        ManifestMismatchError: missing or tampered files, unreadable manifest.
        BackendOptionError: a precision this engine does not compute.
        OpenVinoPrecisionError: ``bf16`` on a CPU without native bf16.
        DeviceError / CudaUnavailableError: a malformed device, or a GPU that is not there.
        IirpError: unknown engine, or an engine that does not run on that device.
    """

    def __init__(
        self, folder: PathLike, engine: str = "ort", device: str = "cpu", options: Optional[BackendOptions] = None
    ) -> None:
        path = Path(os.fspath(folder))
        manifest = Manifest.load(path)
        manifest.verify_files(path, engines=engine == "trt")
        self._setup(manifest, path, engine, device, options, source=str(path))

    @classmethod
    def from_checkpoint(cls, checkpoint: PathLike, device: str = "cpu", options: Optional[BackendOptions] = None,
                        size: Optional[tuple[int, int, int]] = None) -> "EngineSolver":
        """The ``torch`` stages of a checkpoint (no export folder): the same pipeline as an export's.

        ``options.precision`` ``fp16`` runs them in fp16 (CUDA only); ``auto`` is fp32. ``size``: a model grid
        other than the checkpoint's.
        """
        from iirp.runtime.solvers import checkpoint_manifest

        solver = cls.__new__(cls)
        asked = (options or BackendOptions()).precision
        if asked not in ("auto", "fp32", "fp16"):
            raise BackendOptionError(f"engine 'torch' computes fp32 or fp16 (on CUDA), not {asked}")
        manifest, contract = checkpoint_manifest(checkpoint, "fp16" if asked == "fp16" else "fp32", size)
        solver._setup(manifest, None, "torch", device, options, source=manifest.source_path, contract=contract)
        return solver

    def _setup(self, manifest: Manifest, folder: Optional[Path], engine: str, device: str,
               options: Optional[BackendOptions], *, source: str, contract: Optional[ModelContract] = None) -> None:
        if engine not in BACKENDS:
            raise IirpError(f"engine {engine!r} is not available; choose from {', '.join(sorted(BACKENDS))}")
        options = options or BackendOptions()
        self.placement = make_placement(device)
        self.manifest = manifest
        self.folder = folder
        self.engine = engine
        self.device = str(self.placement.device)
        self.contract = contract or manifest.contract
        self.precision, self.precision_note = _resolve_precision(engine, manifest, self.device, options)
        self.options = replace(options, precision=self.precision)
        self.source = source
        self.source_sha256 = manifest.source_sha256
        self.stages = StageSet(manifest, folder, engine, self.placement, self.options)
        self.load_ms: Optional[float] = None
        self._entered = False

    @property
    def model_size(self) -> tuple[int, int, int]:
        """Model grid ``(X, Y, Z)``."""
        return self.contract.size

    def load(self) -> float:
        """Build every stage (sessions, compiled models, the per-stage choice) once; returns the time it took (ms)."""
        if not self._entered:
            t0 = time.perf_counter()
            self.stages.__enter__()
            self._entered = True
            self.load_ms = (time.perf_counter() - t0) * 1e3
        return self.load_ms or 0.0

    def close(self) -> None:
        """Free every stage (also on exit of a ``with`` block)."""
        if self._entered:
            self.stages.__exit__(None, None, None)
            self._entered = False

    def __enter__(self) -> "EngineSolver":
        self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def solve(self, moving: np.ndarray, fixed: np.ndarray, rule: IterStopRule) -> IterStopTrace[np.ndarray]:
        """``(X, Y, Z)`` float32 host volumes in [0, 1] -> trace with a ``(3, X, Y, Z)`` float32 host flow (voxels)."""
        self.manifest.check_input_shape(fixed.shape)
        first = not self._entered
        load_ms = self.load()  # stages are built once and reused across pairs
        if self.placement is HOST:
            set_kernel_threads(self.options.threads)
        trace = register_arrays_with_engines(self.stages, moving, fixed, rule)
        if first:
            trace.timings_ms["load"] = load_ms
        return trace

    @property
    def backend_report(self) -> dict[str, Any]:
        """What the report records about the backends: precision note, threads, memory options, load time, backend
        per stage."""
        report: dict[str, Any] = {
            "precision_note": self.precision_note,
            "threads": self.options.threads,
            "low_memory": self.options.low_memory,
            "slabs": getattr(self.stages[estimator_stage(1)], "slab_count", 1) if self._entered else None,
            "load_ms": self.load_ms,
            "stage_backends": self.stages.runs_on() if self._entered else None,
        }
        if self.engine == "openvino" and self._entered:
            report["openvino"] = {
                "cache_dir": str(self.options.cache_path),
                "stage_choice": {name: getattr(b, "choice", None) for name, b in self.stages.stages.items()},
                "compiled_from_cache": {name: getattr(b, "loaded_from_cache", None)
                                        for name, b in self.stages.stages.items()},
            }
        return report


def _resolve_precision(
    engine: str, manifest: Manifest, device: str, options: BackendOptions
) -> tuple[str, Optional[str]]:
    """``(precision, note)`` the stages will compute in; see :class:`EngineSolver`."""
    if engine == "openvino":
        from iirp.runtime.engines.openvino import check_engine_folder, cpu_has_native_bf16, select_precision

        check_engine_folder(manifest, device)
        native = options.precision != "fp32" and cpu_has_native_bf16()
        choice = select_precision(options.precision, bf16_native=native,
                                  gate=(manifest.openvino or {}).get("bf16_gate"))
        return choice.precision, choice.note
    if options.precision not in ("auto", manifest.precision):
        raise BackendOptionError(
            f"--precision {options.precision} is for engine 'openvino'; engine '{engine}' computes in its "
            f"folder's precision ({manifest.precision})"
        )
    return manifest.precision, None


def set_kernel_threads(threads: Optional[int]) -> None:
    """Threads of the numba kernels for the calling thread (None: numba's default, every core), capped at its pool."""
    import numba

    pool = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    numba.set_num_threads(pool if threads is None else min(threads, pool))
