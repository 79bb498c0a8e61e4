"""ONNX export of RP-Net, fp16 conversion, onnxruntime verification, TensorRT engines (needs torch).

Entry point: :func:`export_checkpoint` (the ``iirp-export`` command). The folder it writes
is described by :class:`iirp.manifest.Manifest`; the stage contract by :mod:`iirp.export.stages`.
``tensorrt`` and ``onnxruntime`` are imported only by the functions that use them.
"""

from __future__ import annotations

from iirp.export.errors import EngineBuildError, ExportError, ExportOptionError, VerificationError
from iirp.export.exporter import (
    DEFAULT_OPSET,
    DYNAMIC_MAX,
    DYNAMIC_MIN,
    MIN_OPSET,
    PRECISIONS,
    export_checkpoint,
)
from iirp.export.verify import (
    FP16_GRAPH_TOLERANCE,
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    Tolerance,
    VerificationReport,
    verify_export,
)

__all__ = [
    "DEFAULT_OPSET",
    "DYNAMIC_MAX",
    "DYNAMIC_MIN",
    "EngineBuildError",
    "ExportError",
    "ExportOptionError",
    "FP16_GRAPH_TOLERANCE",
    "FP16_TOLERANCE",
    "FP32_TOLERANCE",
    "MIN_OPSET",
    "PRECISIONS",
    "Tolerance",
    "VerificationError",
    "VerificationReport",
    "export_checkpoint",
    "verify_export",
]
