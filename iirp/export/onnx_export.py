"""Export one stage module to a self-contained ONNX file (weights embedded, no external data).

Two exporters, tried in this order by ``method="auto"``:

* ``dynamo``: ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` + onnxscript), the
  default since torch 2.9. Its native opset is 18; a lower opset is converted afterwards.
* ``torchscript``: the legacy tracer (``dynamo=False``), used only when the dynamo export
  fails; the manifest records which one produced the files (``exporter["method"]``).

Whatever the exporter calls the symbolic dims, the written graph uses the manifest's
symbols (``"X"``, ``"X/2"``, ...) on its inputs and outputs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from iirp.export.errors import ExportError
from iirp.export.stages import AXES, FEATURE_EXTRACTOR, StageIO, stage_level

if TYPE_CHECKING:
    import onnx
    import torch

__all__ = ["EXPORT_METHODS", "DYNAMO_OPSET", "export_stage", "dynamic_spec", "finalize_model", "check_embedded"]

#: ``auto`` tries dynamo first and falls back to torchscript
EXPORT_METHODS = ("auto", "dynamo", "torchscript")
#: the opset the dynamo exporter emits natively (lower ones are version-converted)
DYNAMO_OPSET = 18


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Silence the exporters' progress prints, warnings and log lines; yields what they printed."""
    captured = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            warnings.simplefilter("ignore")
            yield captured
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def dynamic_spec(stage: str, dims_min: Sequence[int], dims_max: Sequence[int]) -> tuple[dict[int, Any], ...]:
    """``dynamic_shapes`` for the dynamo exporter: one ``torch.export.Dim`` per spatial axis.

    Args:
        stage: stage name; its level scales the range (level L runs at 1/2^(L-1)).
        dims_min, dims_max: full-resolution range ``(X, Y, Z)`` of the model grid.

    Returns:
        One ``{2: X, 3: Y, 4: Z}`` dict per stage input (the estimators' two inputs share dims).
    """
    import torch

    scale = 2 ** (stage_level(stage) - 1)
    dims = {
        2 + k: torch.export.Dim(axis, min=lo // scale, max=hi // scale)
        for k, (axis, lo, hi) in enumerate(zip(AXES, dims_min, dims_max))
    }
    return (dims,) if stage == FEATURE_EXTRACTOR else (dims, dims)


def _dynamic_axes(io_specs: StageIO) -> dict[str, dict[int, str]]:
    """``dynamic_axes`` for the torchscript exporter, named with the manifest's symbols."""
    return {
        spec.name: {k: str(d) for k, d in enumerate(spec.shape) if isinstance(d, str)}
        for spec in [*io_specs[0], *io_specs[1]]
    }


def export_stage(
    module: "torch.nn.Module",
    args: tuple["torch.Tensor", ...],
    path: Path,
    io_specs: StageIO,
    *,
    opset: int,
    method: str,
    dynamic_shapes: Optional[tuple[dict[int, Any], ...]] = None,
) -> None:
    """Export ``module(*args)`` to ``path`` with one exporter (``dynamo`` or ``torchscript``).

    Args:
        module: the stage module, float32, CPU, eval mode.
        args: example inputs (float32 CPU tensors at the export shape).
        path: the ``.onnx`` file to write (weights embedded).
        io_specs: the stage's manifest inputs/outputs; their names become the graph's names.
        opset: ONNX opset to write.
        method: ``dynamo`` or ``torchscript``.
        dynamic_shapes: from :func:`dynamic_spec` for a dynamic export, else None.

    Raises:
        Exception: whatever the exporter raises (the caller decides about the fallback).
    """
    import torch

    input_names = [s.name for s in io_specs[0]]
    output_names = [s.name for s in io_specs[1]]
    with _quiet(), torch.no_grad():
        if method == "dynamo":
            torch.onnx.export(
                module, args, str(path), dynamo=True, input_names=input_names, output_names=output_names,
                opset_version=opset, dynamic_shapes=dynamic_shapes, external_data=False,
                optimize=True, verify=False, report=False, verbose=False,
            )
        elif method == "torchscript":
            torch.onnx.export(
                module, args, str(path), dynamo=False, input_names=input_names, output_names=output_names,
                opset_version=opset, dynamic_axes=_dynamic_axes(io_specs) if dynamic_shapes else None,
                do_constant_folding=True, export_params=True,
            )
        else:
            raise ValueError(f"export_stage() 'method' must be 'dynamo' or 'torchscript', got {method!r}")


def _set_dims(value: "onnx.ValueInfoProto", shape: Sequence[Any], rename: dict[str, str]) -> None:
    dims = value.type.tensor_type.shape.dim
    if len(dims) != len(shape):
        raise ExportError(f"exported input/output {value.name!r} has rank {len(dims)}, expected {len(shape)}")
    for dim, want in zip(dims, shape):
        if isinstance(want, str):
            if dim.HasField("dim_param"):
                rename[dim.dim_param] = want
            dim.dim_param = want
        elif dim.HasField("dim_value") and dim.dim_value != want:
            raise ExportError(f"exported {value.name!r} has shape {[d.dim_value for d in dims]}, expected {shape}")
        else:
            dim.dim_value = int(want)


def finalize_model(model: "onnx.ModelProto", stage: str, io_specs: StageIO, metadata: dict[str, str]) -> None:
    """Name the symbolic dims as the manifest does and record provenance, in place.

    Checks that the graph's inputs and outputs are exactly the contract's names, in order,
    with the contract's static dims.

    Raises:
        ExportError: names, ranks or static dims differ from the contract.
    """
    graph = model.graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    want_in = [s.name for s in io_specs[0]]
    want_out = [s.name for s in io_specs[1]]
    if inputs != want_in or outputs != want_out:
        raise ExportError(
            f"stage {stage}: exported graph has inputs {inputs} and outputs {outputs}, expected {want_in} -> {want_out}"
        )
    rename: dict[str, str] = {}
    for value, spec in zip([*graph.input, *graph.output], [*io_specs[0], *io_specs[1]]):
        _set_dims(value, spec.shape, rename)
    for value in graph.value_info:  # keep intermediate symbols consistent with the I/O ones
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]
    graph.name = stage
    model.doc_string = f"iirp {stage}: see iirp.manifest for the tensor contract"
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def check_embedded(path: os.PathLike[str] | str) -> None:
    """Check that an ONNX file keeps every weight inside itself (no external-data side files).

    Raises:
        ExportError: some initializer refers to external data.
    """
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(f"{path}: initializers stored as external data: {', '.join(external[:3])}")
