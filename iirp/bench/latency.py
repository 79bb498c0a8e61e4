"""Registration latency per engine, with the PyTorch reference as the baseline of every run.

What is timed: the registration core, :meth:`FlowSolver.solve` on a pair already
on the model grid (host arrays in, host flow out: features, every estimator
pass, warps/compositions/upsampling, IterStop scoring and, on a GPU, the
host-device copies). Reading, resampling and writing files are not part of it.

Method: every engine is loaded once, warmed up, then the engines run in
turn (round-robin, so a change in machine load hits all of them alike)
``repeats`` times. Per run the solver's own per-stage clock is read
(``timings_ms`` of its trace); a stage row is the median over runs. The
stage rows must cover the end-to-end time (their median sum within 5 % of the
median end-to-end); ``other`` is what no stage clock saw (Python overhead of
the loop).

Memory: on the CPU, the peak growth of the process's resident set during a
run over its value just before (sampled every 5 ms from ``/proc/self/statm``);
on CUDA, ``torch.cuda.max_memory_allocated`` during the run (torch stages, the
reference) plus what CuPy's memory pool holds after it (the pipeline's arrays).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from iirp.iterstop import IterStopRule

__all__ = ["STAGES", "EngineSpec", "EngineLatency", "measure_latency", "stage_rows", "COVERAGE_TOLERANCE"]

#: Stage rows in display order: per-solver ``timings_ms`` keys (``estimator_K`` per level, coarse to fine).
STAGES = ("upload", "features", "estimator_4", "estimator_3", "estimator_2", "estimator_1", "kernels", "score",
          "download")
#: Largest accepted gap between the median stage sum and the median end-to-end time (fraction).
COVERAGE_TOLERANCE = 0.05


@dataclass
class EngineSpec:
    """One engine to time.

    Attributes:
        name: row label (``reference``, ``ort``, ``ort-fp16``, ``torch-cuda``...).
        make: builds the solver (timed as load time).
        baseline: the PyTorch reference, that the speedups are relative to.
        cuda: the solver runs on a CUDA device (memory via torch).
    """

    name: str
    make: Callable[[], Any]
    baseline: bool = False
    cuda: bool = False


@dataclass
class EngineLatency:
    """Measured runs of one engine (milliseconds)."""

    name: str
    baseline: bool
    load_ms: float = 0.0
    end_to_end_ms: list[float] = field(default_factory=list)
    stages_ms: list[dict[str, float]] = field(default_factory=list)
    peak_memory_mb: list[float] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    estimator_passes: int = 0
    precision: str = "fp32"
    device: str = "cpu"
    #: the solver's ``backend_report`` (stage backends, precision note, threads), where it has one
    backend: dict[str, Any] = field(default_factory=dict)

    def summary(self, reference: Optional["EngineLatency"] = None) -> dict[str, Any]:
        """Medians, spread, stage rows and the speedup over ``reference`` (same run)."""
        baseline_median_ms = float(np.median(reference.end_to_end_ms)) if reference is not None else None
        e2e = np.asarray(self.end_to_end_ms)
        median = float(np.median(e2e))
        stages = {s: float(np.median([run.get(s, 0.0) for run in self.stages_ms])) for s in stage_rows(self)}
        covered = sum(stages.values())
        return {
            "engine": self.name,
            "baseline": self.baseline,
            "device": self.device,
            "precision": self.precision,
            "runs": len(e2e),
            "median_ms": median,
            "p90_ms": float(np.percentile(e2e, 90)),
            "min_ms": float(e2e.min()),
            "load_ms": self.load_ms,
            "pairs_per_s": 1e3 / median,
            "speedup_vs_reference": (baseline_median_ms / median) if baseline_median_ms else None,
            "iterations": self.iterations,
            "iterations_match_reference": reference is None or self.iterations == reference.iterations,
            "estimator_passes": self.estimator_passes,
            "peak_memory_mb": max(self.peak_memory_mb) if self.peak_memory_mb else None,
            "stages_median_ms": stages,
            "stage_backends": self.backend.get("stage_backends"),
            "precision_note": self.backend.get("precision_note"),
            "other_ms": median - covered,
            "stage_coverage": covered / median,
            "end_to_end_ms": self.end_to_end_ms,
        }


def stage_rows(result: EngineLatency) -> list[str]:
    """The :data:`STAGES` this engine's clock reported, in display order."""
    seen = set().union(*result.stages_ms) if result.stages_ms else set()
    return [s for s in STAGES if s in seen]


class _RssSampler:
    """Peak resident set size (bytes) of this process while active, sampled on a thread."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def rss(self) -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * self.page
        except (OSError, ValueError, IndexError):
            return 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "_RssSampler":
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _gpu_memory() -> tuple[Any, Any]:
    """``(torch or None, CuPy's default memory pool or None)``: where a GPU run's arrays come from."""
    torch: Any = None
    try:
        import torch as torch_module

        torch = torch_module if torch_module.cuda.is_available() else None
    except ImportError:
        pass
    try:
        import cupy

        pool = cupy.get_default_memory_pool()
    except ImportError:
        pool = None
    return torch, pool


def _one_run(spec: EngineSpec, solver: Any, moving: np.ndarray, fixed: np.ndarray,
             rule: IterStopRule) -> tuple[float, dict[str, float], float, Any]:
    torch = pool = None
    if spec.cuda:
        torch, pool = _gpu_memory()
        if torch is not None:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if pool is not None:
            pool.free_all_blocks()
    with _RssSampler() as rss:
        t0 = time.perf_counter()
        trace = solver.solve(moving, fixed, rule)  # returns a host flow: synchronized
        elapsed = (time.perf_counter() - t0) * 1e3
    if spec.cuda:
        torch_peak = torch.cuda.max_memory_allocated() if torch is not None else 0
        memory = (torch_peak + (pool.total_bytes() if pool is not None else 0)) / 2**20
    else:
        memory = (rss.peak - rss.start) / 2**20
    stages = {k: float(v) for k, v in trace.timings_ms.items() if k in STAGES}
    return elapsed, stages, memory, trace


def measure_latency(
    specs: Sequence[EngineSpec],
    moving: np.ndarray,
    fixed: np.ndarray,
    rule: IterStopRule,
    *,
    repeats: int = 3,
    warmup: int = 1,
    on_step: Optional[Callable[[str], None]] = None,
) -> list[EngineLatency]:
    """Time every engine on one prepared pair (see the module docstring).

    Args:
        specs: the engines; exactly one must be the baseline.
        moving, fixed: ``(X, Y, Z)`` float32 volumes in [0, 1] on the engines' model grid.
        repeats: timed runs per engine (>= 1); warmup: untimed runs first (>= 0).
        on_step: called with a short description before each run (progress display).

    Raises:
        ValueError: bad ``repeats``/``warmup`` or not exactly one baseline.
        IirpError: an engine fails to load or to run.

    The iteration counts of every engine are kept; :func:`summarize` flags any that differ from the
    reference's (a faster path must not change them).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"measure_latency() needs repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if sum(s.baseline for s in specs) != 1:
        raise ValueError("measure_latency() needs exactly one baseline engine (the PyTorch reference)")
    step = on_step or (lambda _: None)
    solvers, results = [], []
    for spec in specs:
        step(f"loading {spec.name}")
        t0 = time.perf_counter()
        solver = spec.make()
        result = EngineLatency(spec.name, spec.baseline, load_ms=(time.perf_counter() - t0) * 1e3,
                               precision=getattr(solver, "precision", "fp32"), device=str(solver.device),
                               backend=dict(getattr(solver, "backend_report", {})))
        for i in range(warmup):
            step(f"{spec.name}: warm-up {i + 1}/{warmup}")
            solver.solve(moving, fixed, rule)
        solvers.append(solver)
        results.append(result)
    for r in range(repeats):
        for spec, solver, result in zip(specs, solvers, results):
            step(f"{spec.name}: run {r + 1}/{repeats}")
            elapsed, stages, memory, trace = _one_run(spec, solver, moving, fixed, rule)
            result.end_to_end_ms.append(elapsed)
            result.stages_ms.append(stages)
            result.peak_memory_mb.append(memory)
            result.iterations = list(trace.iterations)
            result.estimator_passes = trace.estimator_passes
    for solver in solvers:
        close = getattr(solver, "close", None)
        if close is not None:
            close()
    return results
