"""Exception hierarchy.

Caller mistakes raise ``TypeError``/``ValueError``. Problems with an input
file, an artefact or the environment raise a subclass of :class:`IirpError`;
the CLI turns any ``IirpError`` into one line on stderr and exit code 2.
"""

from __future__ import annotations


class IirpError(Exception):
    """Base class of every error the CLI reports as one line."""


class CheckpointError(IirpError):
    """A checkpoint is missing, unreadable or does not match RP-Net."""


class ImageError(IirpError):
    """An input image is missing, unreadable or unusable (not 3D, NaN, constant...)."""


class TransformError(IirpError):
    """An initial transform file is missing or unusable."""


class OutputError(IirpError):
    """An output location cannot be written."""


class IterStopSpecError(IirpError, ValueError):
    """An ``--iterstop`` specification is malformed."""


class IntensitySpecError(IirpError, ValueError):
    """An ``--intensity`` specification is malformed."""


class RegistrationError(IirpError):
    """A registration cannot give a usable result: the images do not overlap, or the flow or a score is not finite."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) arrived: unwinds like Ctrl-C, so partial outputs are removed.

    Attributes:
        signum: the signal number (exit code ``128 + signum``).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def one_line(text: str, limit: int = 400) -> str:
    """``text`` on one line: whitespace runs (newlines included) become one space, cut at ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
