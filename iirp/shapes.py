"""The model-grid shape rule and the memory a registration on it needs (no torch, no SimpleITK).

RP-Net pools three times by 2, so every axis of a model grid is a multiple of 8; the
coarsest level must still hold a 3x3x3 convolution, so every axis is at least 16 voxels.
Shapes are ``(X, Y, Z)``: array extents in NIfTI (i, j, k) order (see
:mod:`iirp.runtime.geometry`).

A registration holds the feature pyramids of both images, the level-1 estimator's
activations and a few flows at once: at least :data:`MIN_BYTES_PER_VOXEL` bytes per
model-grid voxel (a full-size brain pair peaks at about 3 GB for 4.9 M voxels with every
buffer of the process). :func:`check_fits_in_memory` refuses a grid that cannot fit in
this machine's memory before anything is allocated, instead of an OOM kill.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from iirp.errors import IirpError

__all__ = [
    "MODEL_MULTIPLE",
    "MIN_MODEL_SIZE",
    "MIN_BYTES_PER_VOXEL",
    "ResourceError",
    "is_model_shape",
    "check_model_shape",
    "machine_memory_bytes",
    "check_fits_in_memory",
]

MODEL_MULTIPLE = 8
MIN_MODEL_SIZE = 16
#: Lower bound of a registration's peak memory per model-grid voxel (bytes): both level-1 feature maps
#: (2 x 8 x 4 B), the level-1 estimator's input and activations (about 4 x 16 x 4 B) and three flows (36 B).
MIN_BYTES_PER_VOXEL = 64 + 256 + 36


class ResourceError(IirpError):
    """This machine cannot hold the job (memory)."""


def is_model_shape(shape: Any) -> bool:
    """True for three integers, each a multiple of 8 and at least 16 (bools and floats are not integers)."""
    try:
        dims = list(shape)
    except TypeError:
        return False
    return len(dims) == 3 and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= MIN_MODEL_SIZE and d % MODEL_MULTIPLE == 0
        for d in dims
    )


def check_model_shape(shape: Any, where: str, error: type[Exception] = ValueError) -> tuple[int, int, int]:
    """``shape`` as ``(X, Y, Z)`` ints after checking the model-grid rule.

    Integral floats and numpy integers are accepted (``16.0`` -> 16).

    Args:
        shape: three numbers.
        where: the function and argument or option, for the message (``"--shape"``).
        error: the exception type to raise.

    Raises:
        error: not three integers, each a multiple of 8 and at least 16.
    """
    try:
        dims = tuple(shape)
        ints = tuple(int(d) for d in dims)
        integral = all(not isinstance(d, bool) and float(d) == int(d) for d in dims)
    except (TypeError, ValueError, OverflowError):
        ints, integral = (), False
    if not (integral and is_model_shape(ints)):
        raise error(f"{where} must be 3 multiples of {MODEL_MULTIPLE}, each >= {MIN_MODEL_SIZE}, got {shape!r}")
    return ints  # type: ignore[return-value]


def machine_memory_bytes() -> int:
    """Physical memory this process may use: MemTotal, or a smaller cgroup limit (v2 or v1)."""
    total = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if not total and hasattr(os, "sysconf"):
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            total = 0
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < (total or 1 << 62):
            total = int(text)
    return total


def check_fits_in_memory(shape: Sequence[int], where: str, bytes_per_voxel: int = MIN_BYTES_PER_VOXEL) -> None:
    """Refuse a model grid whose registration cannot fit in this machine's memory.

    Args:
        shape: model grid ``(X, Y, Z)``.
        where: what asks for it (``"checkpoint mind.pt"``), for the message.
        bytes_per_voxel: lower bound of the peak memory per voxel.

    Raises:
        ResourceError: ``voxels * bytes_per_voxel`` exceeds :func:`machine_memory_bytes`.
    """
    voxels = 1
    for s in shape:
        voxels *= int(s)
    need = voxels * bytes_per_voxel
    have = machine_memory_bytes()
    if have and need > have:
        grid = "x".join(str(int(s)) for s in shape)
        raise ResourceError(
            f"{where}: a {grid} model grid needs at least {need / 2**30:.1f} GiB of memory, "
            f"this machine has {have / 2**30:.1f} GiB"
        )
