"""``export_checkpoint``: checkpoint -> five ONNX stages (+ TensorRT engines) + ``manifest.json``.

Steps, all inside a hidden staging folder next to the output folder:

1. validate the options (and read the ``verify_pair`` images) before anything slow;
2. load the checkpoint (:func:`iirp.model.load_checkpoint`), export each stage
   (:mod:`iirp.export.onnx_export`), convert to fp16 if asked (:mod:`iirp.export.fp16`);
3. write ``manifest.json``; verify with onnxruntime (:mod:`iirp.export.verify`);
4. build TensorRT engines if asked (:mod:`iirp.export.tensorrt`);
5. move the folder into place. Any failure removes the staging folder: the output folder is
   left exactly as it was (absent, or holding the previous export).

Dynamic exports accept spatial sizes from :data:`DYNAMIC_MIN` to :data:`DYNAMIC_MAX` voxels per
axis (multiples of 8 at run time), widened to include the export shape; the export shape is
the TensorRT profile's ``opt``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import iirp
from iirp.atomic import replace_folder
from iirp.errors import OutputError
from iirp.export.errors import ExportError, ExportOptionError
from iirp.export.progress import Steps
from iirp.export.stages import StageIO, example_inputs, stage_io, stage_module
from iirp.manifest import MANIFEST_NAME, STAGES, Manifest, ModelContract, StageSpec, sha256_file
from iirp.shapes import check_fits_in_memory, check_model_shape
from iirp.typing import PathLike

if TYPE_CHECKING:
    import numpy as np

    from iirp.model.checkpoint import CheckpointInfo
    from iirp.model.rpnet import RPNet

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "DYNAMIC_MIN",
    "DYNAMIC_MAX",
    "PRECISIONS",
    "export_checkpoint",
]

#: the torch dynamo exporter's native opset (17 also works: it is converted after export)
DEFAULT_OPSET = 18
MIN_OPSET = 17
#: per-axis range of a dynamic export, in voxels of the model grid (widened to the export shape)
DYNAMIC_MIN = 16
DYNAMIC_MAX = 256
PRECISIONS = ("fp32", "fp16")
_OUTPUT_FILES = {MANIFEST_NAME, "timing.cache"} | {f"{s}.onnx" for s in STAGES} | {f"{s}.engine" for s in STAGES}


# --------------------------------------------------------------------------- options


def _check_shape(shape: Optional[Sequence[int]]) -> Optional[tuple[int, int, int]]:
    if shape is None:
        return None
    try:
        [int(s) for s in shape]
    except (TypeError, ValueError) as err:
        raise ExportOptionError(f"export_checkpoint() 'shape' must be 3 integers, got {shape!r}") from err
    dims = check_model_shape(shape, "export_checkpoint() 'shape' (--shape)", ExportOptionError)
    check_fits_in_memory(dims, "export_checkpoint() 'shape' (--shape)")
    return dims


def _require_export_tools(exporter: str = "auto") -> None:
    """torch and onnx must import, and onnxscript (the dynamo exporter's backend) unless ``exporter`` is
    ``torchscript`` (then it is not imported: its import alone takes seconds).

    Raises:
        ExportError: naming the missing package and the extra that installs it.
    """
    import importlib

    for name in ("torch", "onnx") + (() if exporter == "torchscript" else ("onnxscript",)):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ExportError(
                f"iirp-export needs {name} ({err}); install the export tools with: pip install 'iirp[export]'"
            ) from err


def _check_options(precision: str, opset: int, exporter: str) -> None:
    from iirp.export.onnx_export import EXPORT_METHODS

    if precision not in PRECISIONS:
        raise ExportOptionError(f"export_checkpoint() 'precision' must be fp32 or fp16, got {precision!r}")
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ExportOptionError(
            f"export_checkpoint() 'opset' must be an integer from {MIN_OPSET} to {newest}, got {opset!r}"
        )
    if exporter not in EXPORT_METHODS:
        raise ExportOptionError(f"export_checkpoint() 'exporter' must be one of {EXPORT_METHODS}, got {exporter!r}")


def _read_pair(pair: Sequence[PathLike], contract: ModelContract) -> "tuple[np.ndarray, np.ndarray]":
    """The verify pair as ``(fixed, moving)`` ``(X, Y, Z)`` float32 arrays on the model's grid (its intensity rule)."""
    from iirp.runtime.imageio import read_image
    from iirp.runtime.register import RegistrationOptions, prepare_pair

    if len(pair) != 2:
        raise ExportOptionError(f"export_checkpoint() 'verify_pair' must be (FIXED, MOVING), got {pair!r}")
    fixed = read_image(pair[0], "fixed")
    moving = read_image(pair[1], "moving")
    prepared = prepare_pair(fixed, moving, contract, RegistrationOptions())
    return prepared.fixed, prepared.moving


def model_contract(info: "CheckpointInfo", size: tuple[int, int, int], spacing: Optional[Union[float, Sequence[float]]],
                   intensity: Optional[str]) -> ModelContract:
    """The model grid an export records: the checkpoint's record, else the options, else 1 mm, RAS, minmax.

    Raises:
        ExportOptionError: an option contradicts what the checkpoint records.
    """
    from iirp.runtime.intensity import parse_intensity

    asked = None
    if spacing is not None:
        asked = tuple(float(v) for v in ((spacing,) * 3 if isinstance(spacing, (int, float)) else spacing))
        if len(asked) != 3 or not all(0 < v < float("inf") for v in asked):
            raise ExportOptionError(f"export_checkpoint() 'spacing' (--spacing) must be positive mm, got {spacing!r}")
    if asked is not None and info.spacing is not None and any(
            abs(a - b) > 1e-6 * max(1.0, b) for a, b in zip(asked, info.spacing)):
        raise ExportOptionError(
            f"--spacing {' '.join(f'{v:g}' for v in asked)} contradicts checkpoint {info.path}, which records a "
            f"{' x '.join(f'{v:g}' for v in info.spacing)} mm model grid"
        )
    rule = parse_intensity(intensity).spec if intensity is not None else None
    if rule is not None and info.intensity is not None and rule != info.intensity:
        raise ExportOptionError(f"--intensity {rule} contradicts checkpoint {info.path}, which was trained with "
                                f"{info.intensity}")
    return ModelContract(size, asked or info.spacing or (1.0, 1.0, 1.0),  # type: ignore[arg-type]
                         info.orientation or "RAS", rule or info.intensity or "minmax")


def _check_labels(labels: Sequence[PathLike], pair: Optional[Sequence[PathLike]]) -> None:
    """The gate's label maps: a pair of readable label maps, and only with a verify pair.

    Raises:
        ExportOptionError: labels without ``verify_pair``, or not two of them.
        ImageError: a label map cannot be read.
    """
    from iirp.runtime.imageio import read_labels

    if pair is None:
        raise ExportOptionError("export_checkpoint() 'verify_labels' (--verify-labels) needs --verify-pair")
    if len(labels) != 2:
        raise ExportOptionError(f"export_checkpoint() 'verify_labels' must be (FIXED_SEG, MOVING_SEG), got {labels!r}")
    read_labels(labels[0], "fixed-seg")
    read_labels(labels[1], "moving-seg")


# --------------------------------------------------------------------------- output folder


def _replaceable(out: Path) -> None:
    """Check that ``out`` may be replaced: absent, an empty folder, or an earlier export.

    Raises:
        OutputError: a file is in the way, or the folder holds files an export does not write.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"output folder {out} exists and is not a folder")
    names = {p.name for p in out.iterdir()}
    foreign = sorted(n for n in names if n not in _OUTPUT_FILES or not (out / n).is_file())
    if foreign:
        raise OutputError(
            f"output folder {out} holds files an export does not write ({', '.join(foreign[:3])}); "
            "choose a new or empty folder, or an earlier export folder to replace"
        )


# --------------------------------------------------------------------------- stages


def _export_all(
    net: "RPNet", io: dict[str, StageIO], folder: Path, *, shape: tuple[int, int, int], opset: int,
    dynamic_range: Optional[dict[str, list[int]]], method: str, steps: Steps,
) -> None:
    from iirp.export.onnx_export import dynamic_spec, export_stage

    for stage in STAGES:
        module = stage_module(net, stage)
        with steps.step(f"export {stage} ({method})"):
            dyn = (
                dynamic_spec(stage, dynamic_range["min"], dynamic_range["max"]) if dynamic_range is not None else None
            )
            args = example_inputs(io[stage], shape)
            export_stage(module, args, folder / f"{stage}.onnx", io[stage], opset=opset, method=method,
                         dynamic_shapes=dyn)


def _export_with_fallback(
    net: "RPNet", io: dict[str, StageIO], folder: Path, exporter: str, steps: Steps, **kw: Any
) -> dict[str, str]:
    """Export every stage with dynamo, falling back to torchscript for all of them if dynamo fails."""
    methods = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    errors: list[str] = []
    for method in methods:
        try:
            _export_all(net, io, folder, method=method, steps=steps, **kw)
        except Exception as err:  # each exporter raises many types
            first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
            errors.append(f"{method}: {type(err).__name__}: {first[:300]}")
            if method != methods[-1]:
                steps.log(f"[yellow]dynamo export failed ({errors[-1]}); retrying with the torchscript exporter")
            continue
        info = {"method": method}
        if errors:
            info["dynamo_error"] = errors[0]
        return info
    raise ExportError("ONNX export failed: " + " | ".join(errors))


def _finalize(
    folder: Path, io: dict[str, StageIO], *, precision: str, opset: int, source_sha256: str
) -> dict[str, StageSpec]:
    """Rename dims, stamp provenance, convert to fp16 if asked, check and hash every stage file."""
    import onnx

    from iirp.export.fp16 import convert_to_fp16
    from iirp.export.onnx_export import check_embedded, finalize_model

    stages: dict[str, StageSpec] = {}
    for stage in STAGES:
        path = folder / f"{stage}.onnx"
        model = onnx.load(str(path))
        written = {o.domain or "ai.onnx": o.version for o in model.opset_import}.get("ai.onnx")
        if written != opset:
            raise ExportError(f"stage {stage}: the exporter wrote opset {written}, not the requested {opset}")
        finalize_model(model, stage, io[stage], {
            "iirp_stage": stage, "iirp_precision": precision, "iirp_source_sha256": source_sha256,
            "iirp_version": iirp.__version__,
        })
        if precision == "fp16":
            convert_to_fp16(model)
        else:
            try:
                onnx.checker.check_model(model, full_check=True)
            except onnx.checker.ValidationError as err:
                raise ExportError(f"stage {stage}: exported graph is invalid: {err}") from err
        onnx.save_model(model, str(path), save_as_external_data=False)
        check_embedded(path)
        stages[stage] = StageSpec(file=path.name, sha256=sha256_file(path), inputs=io[stage][0], outputs=io[stage][1])
    return stages


def _versions(method_info: dict[str, str]) -> dict[str, str]:
    import onnx
    import torch

    versions = {"torch": str(torch.__version__), "onnx": str(onnx.__version__)}
    for name in ("onnxruntime", "onnxscript"):
        try:
            versions[name] = str(__import__(name).__version__)
        except Exception:  # not installed, or broken: just not recorded
            pass
    return {**versions, **method_info}


def _manifest(
    info: "CheckpointInfo", net: "RPNet", contract: ModelContract, stages: dict[str, StageSpec], *,
    precision: str, opset: int, dynamic_range: Optional[dict[str, list[int]]], exporter: dict[str, str],
) -> Manifest:
    from iirp.model.rpnet import level_channels

    feats, q = level_channels(info.first_channel)
    return Manifest(
        source_sha256=info.sha256,
        source_path=str(Path(info.path).absolute()),
        model={
            "in_channel": 1,
            "first_channel": info.first_channel,
            "feature_channels": list(feats),
            "estimator_channels": list(q),
            "n_resblocks": info.n_resblocks,
            "n_parameters": info.n_parameters,
            "checkpoint_format": info.format,
        },
        model_grid={"size": list(contract.size), "spacing": list(contract.spacing),
                    "orientation": contract.orientation},
        intensity=contract.intensity,
        precision=precision,
        opset=opset,
        dynamic=dynamic_range is not None,
        dynamic_range=dynamic_range,
        stages=stages,
        exporter=exporter,
        iirp_version=iirp.__version__,
    )


# --------------------------------------------------------------------------- entry point


def export_checkpoint(
    checkpoint: PathLike,
    out_dir: PathLike,
    *,
    shape: Optional[Sequence[int]] = None,
    dynamic: bool = False,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    trt: bool = False,
    verify: bool = True,
    verify_pair: Optional[Sequence[PathLike]] = None,
    progress: bool = True,
    exporter: str = "auto",
    verify_labels: Optional[Sequence[PathLike]] = None,
    spacing: Optional[Union[float, Sequence[float]]] = None,
    intensity: Optional[str] = None,
) -> Manifest:
    """Export an RP-Net checkpoint to an engine folder.

    Writes ``feature_extractor.onnx``, ``flow_estimator_{1..4}.onnx`` (weights embedded),
    ``manifest.json`` and, with ``trt``, one ``.engine`` per stage and ``timing.cache``.
    See :mod:`iirp.manifest` and :mod:`iirp.export.stages` for the tensor contract.

    Args:
        checkpoint: released-format or bare-state-dict RP-Net checkpoint.
        out_dir: output folder; created, or replaced when it is empty or an earlier export.
        shape: model grid ``(X, Y, Z)`` (multiples of 8, >= 16); default: the checkpoint's size.
        dynamic: symbolic spatial dims, valid from :data:`DYNAMIC_MIN` to :data:`DYNAMIC_MAX` per
            axis (widened to include ``shape``); the files are verified at ``shape``.
        precision: ``fp32``, or ``fp16`` (fp16 weights and compute, fp32 inputs and outputs).
        opset: ONNX opset, :data:`MIN_OPSET` or newer.
        trt: also build TensorRT engines (needs ``tensorrt``; checked before anything else).
        verify: compare every stage with PyTorch using onnxruntime (CPU); a mismatch fails.
        verify_pair: ``(FIXED, MOVING)`` image files to verify with as well (prepared as
            ``iirp-run`` does, onto the model grid, minmax intensities); with ``verify`` it also
            runs the OpenVINO bf16 accuracy gate (:mod:`iirp.export.openvino_gate`), recorded in
            ``manifest.openvino``.
        verify_labels: ``(FIXED_SEG, MOVING_SEG)`` label maps of ``verify_pair``: the gate's Dice.
        progress: show progress and the verification table on the terminal (rich).
        exporter: ``auto`` (dynamo, else torchscript), ``dynamo`` or ``torchscript``.
        spacing: the model grid spacing in mm (one number, or x y z) for a checkpoint that records
            none; it must match one that does. Default: the checkpoint's record, else 1 mm.
        intensity: the intensity rule the model was trained with (the default of ``iirp-run
            --intensity``), for a checkpoint that records none; it must match one that does.

    The model contract (grid size, spacing, orientation, intensity rule; :class:`~iirp.manifest.ModelContract`)
    goes into the manifest's ``model_grid`` and ``intensity``, which ``iirp-run`` reads.

    Returns:
        The manifest written to ``out_dir/manifest.json``.

    Raises:
        ExportOptionError: a malformed option.
        CheckpointError / ImageError: unreadable checkpoint or verify pair.
        OutputError: the output folder cannot be written or holds foreign files.
        ExportError: both exporters failed, or the graph is unusable.
        VerificationError: a stage differs from PyTorch beyond its tolerance.
        EngineBuildError: TensorRT missing or failing.
    """
    t0 = time.perf_counter()
    _require_export_tools(exporter)
    dims = _check_shape(shape)
    _check_options(precision, opset, exporter)
    if trt:
        from iirp.export.tensorrt import require_tensorrt

        require_tensorrt()
    out = Path(os.fspath(out_dir)).absolute()
    _replaceable(out)

    from iirp.model.checkpoint import load_checkpoint

    net, info = load_checkpoint(checkpoint, size=dims)
    size: tuple[int, int, int] = tuple(int(s) for s in info.size)  # type: ignore[assignment]
    contract = model_contract(info, size, spacing, intensity)
    pair = _read_pair(verify_pair, contract) if verify_pair is not None else None
    if verify_labels is not None:
        _check_labels(verify_labels, verify_pair)
    dynamic_range = None
    if dynamic:
        dynamic_range = {
            "min": [DYNAMIC_MIN] * 3,
            "opt": list(size),
            "max": [max(DYNAMIC_MAX, s) for s in size],
        }
    from iirp.model.rpnet import level_channels

    io = stage_io(level_channels(info.first_channel)[0], None if dynamic else size)

    with Steps(progress) as steps, replace_folder(out) as folder:
        method = _export_with_fallback(
            net, io, folder, exporter, steps, shape=size, opset=opset, dynamic_range=dynamic_range
        )
        with steps.step(f"write {precision} files and manifest"):
            stages = _finalize(folder, io, precision=precision, opset=opset, source_sha256=info.sha256)
            manifest = _manifest(info, net, contract, stages, precision=precision, opset=opset,
                                 dynamic_range=dynamic_range, exporter=_versions(method))
            manifest.save(folder)
        if verify:
            from iirp.export.verify import report_table, verify_export

            report = verify_export(folder, net, manifest, pair=pair, steps=steps)
            steps.print(report_table(report))
            report.raise_for_failure()
            if verify_pair is not None:
                from iirp.export.openvino_gate import bf16_gate

                gate = bf16_gate(folder, manifest, verify_pair, verify_labels, steps=steps)
                manifest.openvino = {"bf16_gate": gate}
                manifest.save(folder)
        if trt:
            from iirp.export.tensorrt import build_engines

            with steps.step("build TensorRT engines"):
                build_engines(folder, manifest, previous=out if out.is_dir() else None)
                manifest.save(folder)
        steps.log(f"exported to {out} in {time.perf_counter() - t0:.1f} s")
    return manifest
