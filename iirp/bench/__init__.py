"""Benchmarks as a library: latency per engine and accuracy per method, with reports people read.

``iirp-bench latency`` and ``iirp-bench accuracy`` are thin commands over
:func:`latency_benchmark` and :func:`accuracy_benchmark`. Nothing here is
imported by the runtime.
"""

from __future__ import annotations

from iirp.bench.run import accuracy_benchmark, latency_benchmark

__all__ = ["latency_benchmark", "accuracy_benchmark"]
