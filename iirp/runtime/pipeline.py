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
from pathlib import Path
from typing import Optional

import numpy as np

from iirp import kernels
from iirp.errors import IirpError
from iirp.iterstop import IterStopRule, IterStopTrace, run_iterstop
from iirp.manifest import Manifest, estimator_stage
from iirp.runtime.engines import BACKENDS, StageSet
from iirp.typing import PathLike

__all__ = ["EngineLevelOps", "EngineSolver", "register_arrays_with_engines"]


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
    TensorRT engines for ``trt``), and the engine's own checks (GPU and
    TensorRT version) when its stages are entered.

    Raises:
        ManifestMismatchError: missing or tampered files, unreadable manifest.
        IirpError: unknown engine.
    """

    def __init__(self, folder: PathLike, engine: str = "ort", device: str = "cpu") -> None:
        if engine not in BACKENDS:
            raise IirpError(f"engine {engine!r} is not available; choose from {', '.join(sorted(BACKENDS))}")
        self.folder = Path(os.fspath(folder))
        self.manifest = Manifest.load(self.folder)
        self.manifest.verify_files(self.folder, engines=engine == "trt")
        self.engine = engine
        self.device = device
        self.model_size = self.manifest.size
        self.precision = self.manifest.precision
        self.source = str(self.folder)
        self.source_sha256 = self.manifest.source_sha256
        self.stages = StageSet(self.manifest, self.folder, engine, device)
        self._entered = False

    def close(self) -> None:
        if self._entered:
            self.stages.__exit__(None, None, None)
            self._entered = False

    def solve(self, moving: np.ndarray, fixed: np.ndarray, rule: IterStopRule) -> IterStopTrace[np.ndarray]:
        self.manifest.check_input_shape(fixed.shape)
        if not self._entered:  # sessions are built once and reused across pairs
            self.stages.__enter__()
            self._entered = True
        return register_arrays_with_engines(self.stages, moving, fixed, rule)
