"""The one parser of device strings: ``cpu``, ``cuda`` or ``cuda:N`` (no torch, no CUDA library needed).

Every command and library function that takes a device parses it here, once, into a
:class:`Device`; whether a CUDA device is actually there is asked of the GPU array library
when a placement is built (:mod:`iirp.runtime.placement`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from iirp.errors import IirpError

__all__ = ["Device", "DeviceError", "CPU", "parse_device"]

_CUDA = re.compile(r"^cuda(?::(\d{1,3}))?$")


class DeviceError(IirpError, ValueError):
    """A device string is malformed, or names a device this machine does not have."""


@dataclass(frozen=True)
class Device:
    """Where arrays live and stages run.

    Attributes:
        kind: ``cpu`` or ``cuda``.
        index: the CUDA device ordinal (0 for the CPU).
    """

    kind: Literal["cpu", "cuda"]
    index: int = 0

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


CPU = Device("cpu")


def parse_device(value: Any, where: str = "device") -> Device:
    """``cpu``, ``cuda`` (device 0) or ``cuda:N`` as a :class:`Device`; a :class:`Device` passes through.

    Args:
        value: the string (or a Device).
        where: the option or argument, for the message (``"--device"``).

    Raises:
        DeviceError: anything else.
    """
    if isinstance(value, Device):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text == "cpu":
        return CPU
    match = _CUDA.match(text or "")
    if match is None:
        raise DeviceError(f"{where} must be 'cpu' or 'cuda[:N]', got {value!r}")
    return Device("cuda", int(match.group(1) or 0))
