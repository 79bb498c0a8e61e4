"""The IterStop pipeline over exported stages: engine-agnostic, torch-free.

The stopping rules come from :mod:`iirp.iterstop` (the same definitions the
PyTorch reference uses); stages run through a :class:`~iirp.runtime.engines.StageSet`
and everything between them (warping features, composing flows, 2x upsampling
and the fused full-resolution score) runs in :mod:`iirp.kernels`.

Arrays are host numpy, float32, batch-free: volumes ``(X, Y, Z)``, features
``(C, x, y, z)``, flows ``(3, x, y, z)`` in voxels of their level (see
:mod:`iirp.runtime.geometry`).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from iirp import kernels
from iirp.errors import IirpError
from iirp.iterstop import IterStopRule, IterStopTrace, run_iterstop
from iirp.manifest import Manifest, estimator_stage
from iirp.runtime.engines import BACKENDS, StageSet
from iirp.runtime.engines.options import BackendOptionError, BackendOptions
from iirp.typing import PathLike

__all__ = ["EngineLevelOps", "EngineSolver", "register_arrays_with_engines", "set_kernel_threads"]


class _Clock:
    """Accumulates wall time per stage name (ms)."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = defaultdict(float)

    def add(self, name: str, start: float) -> None:
        self.ms[name] += (time.perf_counter() - start) * 1e3


class EngineLevelOps:
    """:class:`iirp.iterstop.LevelOps` over exported stages and the CPU kernels.

    Args:
        stages: an entered :class:`StageSet`.
        moving, fixed: ``(X, Y, Z)`` float32 volumes in [0, 1] on the model grid.
        clock: optional per-stage timer.
    """

    def __init__(self, stages: StageSet, moving: np.ndarray, fixed: np.ndarray, clock: Optional[_Clock] = None):
        self.stages = stages
        self.moving = np.ascontiguousarray(moving, dtype=np.float32)
        self.fixed = np.ascontiguousarray(fixed, dtype=np.float32)
        self.clock = clock or _Clock()
        t0 = time.perf_counter()
        batch = np.stack([self.fixed, self.moving])[:, None]  # (2, 1, X, Y, Z): fixed, moving
        out = stages["feature_extractor"].infer({"image": batch})
        self.fixed_features = [np.ascontiguousarray(out[f"f{k}"][0]) for k in (1, 2, 3, 4)]
        self.moving_features = [np.ascontiguousarray(out[f"f{k}"][1]) for k in (1, 2, 3, 4)]
        self.clock.add("features", t0)

    def zero_flow(self, level: int) -> np.ndarray:
        return np.zeros((3, *self.moving_features[level - 1].shape[1:]), dtype=np.float32)

    def estimate(self, level: int, flow: Optional[np.ndarray]) -> np.ndarray:
        t0 = time.perf_counter()
        moving = self.moving_features[level - 1]
        warped = moving if flow is None else kernels.warp(moving, flow)
        self.clock.add("kernels", t0)
        t0 = time.perf_counter()
        feeds = {"moving_features": warped[None], "fixed_features": self.fixed_features[level - 1][None]}
        du = self.stages[estimator_stage(level)].infer(feeds)["flow"][0]
        self.clock.add(f"estimator_{level}", t0)
        return np.ascontiguousarray(du, dtype=np.float32)

    def compose(self, flow: Optional[np.ndarray], du: np.ndarray) -> np.ndarray:
        if flow is None:
            return du
        t0 = time.perf_counter()
        out = kernels.compose(flow, du)
        self.clock.add("kernels", t0)
        return out

    def upsample(self, flow: np.ndarray, level: int) -> np.ndarray:
        t0 = time.perf_counter()
        out = kernels.upsample2(flow)  # vectors doubled with the grid
        self.clock.add("kernels", t0)
        return out

    def score(self, level: int, flow: np.ndarray) -> float:
        t0 = time.perf_counter()
        value = kernels.fused_ncc_score(self.moving, self.fixed, flow, 2 ** (level - 1))
        self.clock.add("score", t0)
        return value


def register_arrays_with_engines(
    stages: StageSet, moving: np.ndarray, fixed: np.ndarray, rule: IterStopRule
) -> IterStopTrace[np.ndarray]:
    """Run IIRP over entered ``stages``; the trace's ``timings_ms`` holds per-stage totals."""
    clock = _Clock()
    t0 = time.perf_counter()
    ops = EngineLevelOps(stages, moving, fixed, clock)
    trace = run_iterstop(ops, rule)
    clock.add("iirp", t0)
    trace.timings_ms = dict(clock.ms)
    return trace


class EngineSolver:
    """A :class:`~iirp.runtime.solvers.FlowSolver` over an exported engine folder.

    The manifest is checked when the solver is built: file hashes (ONNX, or the
    TensorRT engines for ``trt``), the precision (resolved here for ``openvino``,
    :func:`~iirp.runtime.engines.openvino.select_precision`), and the engine's own checks
    (GPU and TensorRT version) when its stages are loaded (:meth:`load`, or the first
    :meth:`solve`, whose trace then carries the load time as ``timings_ms["load"]``).

    Args:
        folder: an ``iirp-export`` folder.
        engine: registered backend name (``ort``, ``openvino``, ``trt``, ``torch``).
        device: ``cpu`` or ``cuda[:N]``.
        options: precision, threads and cache folder (:class:`BackendOptions`).

    Attributes:
        precision: what the stages compute in (``fp32``, ``fp16``, ``bf16``).
        precision_note: why ``auto`` chose that precision, or None.

    Raises:
        ManifestMismatchError: missing or tampered files, unreadable manifest.
        BackendOptionError: a precision this engine does not compute.
        OpenVinoPrecisionError: ``bf16`` on a CPU without native bf16.
        IirpError: unknown engine.
    """

    def __init__(
        self, folder: PathLike, engine: str = "ort", device: str = "cpu", options: Optional[BackendOptions] = None
    ) -> None:
        if engine not in BACKENDS:
            raise IirpError(f"engine {engine!r} is not available; choose from {', '.join(sorted(BACKENDS))}")
        options = options or BackendOptions()
        self.folder = Path(os.fspath(folder))
        self.manifest = Manifest.load(self.folder)
        self.manifest.verify_files(self.folder, engines=engine == "trt")
        self.engine = engine
        self.device = device
        self.model_size = self.manifest.size
        self.precision, self.precision_note = _resolve_precision(engine, self.manifest, device, options)
        self.options = replace(options, precision=self.precision)
        self.source = str(self.folder)
        self.source_sha256 = self.manifest.source_sha256
        self.stages = StageSet(self.manifest, self.folder, engine, device, self.options)
        self.load_ms: Optional[float] = None
        self._entered = False

    def load(self) -> float:
        """Build every stage (sessions, compiled models, the per-stage choice) once; returns the time it took (ms)."""
        if not self._entered:
            t0 = time.perf_counter()
            self.stages.__enter__()
            self._entered = True
            self.load_ms = (time.perf_counter() - t0) * 1e3
        return self.load_ms or 0.0

    def close(self) -> None:
        if self._entered:
            self.stages.__exit__(None, None, None)
            self._entered = False

    def solve(self, moving: np.ndarray, fixed: np.ndarray, rule: IterStopRule) -> IterStopTrace[np.ndarray]:
        self.manifest.check_input_shape(fixed.shape)
        first = not self._entered
        load_ms = self.load()  # sessions are built once and reused across pairs
        set_kernel_threads(self.options.threads)
        trace = register_arrays_with_engines(self.stages, moving, fixed, rule)
        if first:
            trace.timings_ms["load"] = load_ms
        return trace

    @property
    def backend_report(self) -> dict[str, Any]:
        """What the report records about the backends: precision note, threads, load time, backend per stage."""
        report: dict[str, Any] = {
            "precision_note": self.precision_note,
            "threads": self.options.threads,
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
