"""Errors raised by the exporter (all :class:`~iirp.errors.IirpError`, so the CLI prints one line, exit 2)."""

from __future__ import annotations

from iirp.errors import IirpError

__all__ = ["ExportOptionError", "ExportError", "VerificationError", "EngineBuildError"]


class ExportOptionError(IirpError, ValueError):
    """An export option (shape, precision, opset, pair...) is malformed or inconsistent."""


class ExportError(IirpError):
    """The ONNX export itself failed (both exporters, or the graph conversion), or its output is unusable."""


class VerificationError(ExportError):
    """An exported stage does not match PyTorch within the tolerance of its precision."""


class EngineBuildError(IirpError):
    """TensorRT is missing, or it could not parse a stage or build its engine (message carries the log)."""
