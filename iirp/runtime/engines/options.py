"""What the user chose for the CPU backends, parsed once at the edge and passed down as one object.

:class:`BackendOptions` travels from the CLI through :func:`iirp.runtime.make_solver`,
:class:`~iirp.runtime.pipeline.EngineSolver` and :class:`~iirp.runtime.engines.StageSet` to
every :class:`~iirp.runtime.engines.Backend`. It is validated when it is built, so a bad
``--threads`` or ``--precision`` is one clear error before anything is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from iirp.errors import IirpError
from iirp.typing import PathLike

__all__ = [
    "LOW_MEMORY_SLABS",
    "MAX_SLABS",
    "PRECISIONS",
    "STAGE_BACKENDS",
    "BackendOptionError",
    "BackendOptions",
    "default_cache_dir",
    "usable_cores",
]

#: ``--precision`` values: ``auto`` lets the engine choose (see :mod:`iirp.runtime.engines.openvino`);
#: ``bf16`` is OpenVINO's, ``fp16`` the torch engine's on CUDA when it runs straight from a checkpoint.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Most slabs ``--slabs`` takes (past a few, each slab's halo costs more time than the memory saved).
MAX_SLABS = 16
#: Most slabs of the finest estimator under ``--low-memory`` (engine ``openvino``; fewer on a small grid, see
#: :func:`iirp.runtime.slabs.affordable_slabs`): at full size ``--low-memory`` took the peak from 2523 to
#: 1374 MiB for 1.3 s, ``--slabs 4`` to 1576 MiB for 0.9 s (benchmarks/results/cpu_engines.md).
LOW_MEMORY_SLABS = 8
#: Backends the ``openvino`` engine may run a stage on.
STAGE_BACKENDS = ("openvino", "ort")


class BackendOptionError(IirpError, ValueError):
    """A backend option (``--precision``, ``--threads``, stage plan) is malformed."""


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_cache_dir() -> Path:
    """Where compiled OpenVINO models and the per-stage backend choice are cached.

    ``$IIRP_CACHE_DIR/openvino`` when ``IIRP_CACHE_DIR`` is set, else ``~/.cache/iirp/openvino``
    (the demo engines live beside it, in ``<cache>/demo``).
    """
    env = os.environ.get("IIRP_CACHE_DIR")
    root = Path(env) if env else Path.home() / ".cache" / "iirp"
    return root / "openvino"


@dataclass(frozen=True)
class BackendOptions:
    """Options of the CPU stage backends.

    Attributes:
        precision: ``auto``, ``fp32`` or ``bf16`` as asked for. Engines other than ``openvino``
            compute in their folder's precision and accept ``auto`` or that precision only. The
            solver replaces ``auto`` by what it resolved before the stages are built.
        threads: intra-op threads for onnxruntime (``intra_op_num_threads``), OpenVINO
            (``INFERENCE_NUM_THREADS``), torch (``set_num_threads``) and the numba kernels
            (``numba.set_num_threads``, capped at numba's pool); None leaves each library its
            default, which uses all cores.
        cache_dir: OpenVINO's compiled-model cache and the per-stage choice file; None is
            :func:`default_cache_dir`.
        stages: the ``openvino`` engine's backend per stage (``openvino`` or ``ort``); None
            measures once per machine and caches the choice. Stages left out are measured.
        slabs: the ``openvino`` engine runs the finest flow estimator in this many slabs along X
            (:mod:`iirp.runtime.slabs`): the same flow, that stage's working memory cut to about
            ``1/slabs`` plus its halo, for a little more time. 1 runs it whole (or, with ``low_memory``,
            in up to :data:`LOW_MEMORY_SLABS`).
        low_memory: less memory for a little time (README, Memory): onnxruntime runs without its
            CPU memory arena; OpenVINO runs the finest estimator in slabs and unloads each stage once
            a pair is done with it. The flows do not change.

    Raises:
        BackendOptionError: a value outside the above (raised on construction).
    """

    precision: str = "auto"
    threads: Optional[int] = None
    cache_dir: Optional[PathLike] = None
    stages: Optional[Mapping[str, str]] = field(default=None, hash=False)
    slabs: int = 1
    low_memory: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.precision, str) or self.precision.strip().lower() not in PRECISIONS:
            raise BackendOptionError(
                f"BackendOptions() 'precision' (--precision) must be one of {', '.join(PRECISIONS)}, "
                f"got {self.precision!r}"
            )
        object.__setattr__(self, "precision", self.precision.strip().lower())
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise BackendOptionError(
                f"BackendOptions() 'threads' (--threads) must be an integer >= 1, got {self.threads!r}"
            )
        if isinstance(self.slabs, bool) or not isinstance(self.slabs, int) or not 1 <= self.slabs <= MAX_SLABS:
            raise BackendOptionError(
                f"BackendOptions() 'slabs' (--slabs) must be an integer from 1 to {MAX_SLABS}, got {self.slabs!r}"
            )
        if not isinstance(self.low_memory, bool):
            raise BackendOptionError(f"BackendOptions() 'low_memory' must be True or False, got {self.low_memory!r}")
        if self.stages is not None:
            from iirp.manifest import STAGES

            bad = {k: v for k, v in self.stages.items() if k not in STAGES or v not in STAGE_BACKENDS}
            if bad:
                raise BackendOptionError(
                    f"BackendOptions() 'stages' maps stage names ({', '.join(STAGES)}) to "
                    f"{' or '.join(STAGE_BACKENDS)}, got {bad!r}"
                )

    @property
    def slabs_asked(self) -> bool:
        """Whether the ``openvino`` engine's finest estimator may run in slabs: ``slabs`` > 1, or ``low_memory``
        (then up to :data:`LOW_MEMORY_SLABS`, as many as the grid affords)."""
        return self.slabs > 1 or self.low_memory

    @property
    def cache_path(self) -> Path:
        """:attr:`cache_dir` as a path (the default when None)."""
        return Path(os.fspath(self.cache_dir)) if self.cache_dir is not None else default_cache_dir()
