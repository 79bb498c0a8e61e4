"""What a benchmark ran on: machine, accelerator, driver and library versions (no heavy imports).

Every number the benchmarks write is stored with this record, so a figure
always names its machine.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from typing import Any

__all__ = ["cpu_model", "gpu_info", "environment", "markdown_table", "loadavg"]

#: Distributions whose versions every report records.
PACKAGES = ("iirp", "numpy", "torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "numba", "SimpleITK",
            "cuda-core", "cuda-bindings", "cupy-cuda12x")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def gpu_info() -> list[dict[str, str]]:
    """One entry per NVIDIA GPU (name, driver, memory) from ``nvidia-smi``; empty without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            gpus.append(dict(zip(("name", "driver", "memory", "compute_capability"), parts)))
    return gpus


def loadavg() -> str:
    """The 1/5/15-minute load averages, so a report shows whether the machine was quiet."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def environment(packages: tuple[str, ...] = PACKAGES) -> dict[str, Any]:
    """Machine, accelerator and library versions (a package that is not installed is left out)."""
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "gpus": gpu_info(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": loadavg(),
        "versions": versions,
    }


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
