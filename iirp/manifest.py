"""The engine folder's ``manifest.json``: what was exported, from what, and how to check it.

Torch-free: the exporter (:mod:`iirp.export`) writes it, the runtime reads and
checks it before anything runs. Shapes are lists whose entries are ints or,
for dynamic exports, the symbols ``"X"``, ``"Y"``, ``"Z"`` scaled per level
(``"X/2"``, ``"X/4"``, ``"X/8"``).

Stages: ``feature_extractor`` (input ``image`` ``(2, 1, X, Y, Z)``: fixed and
moving as one batch; outputs ``f1..f4``) and ``flow_estimator_{1..4}``
(inputs ``moving_features``, ``fixed_features`` ``(1, C, x, y, z)``; output
``flow`` ``(1, 3, x, y, z)`` in voxels of that level).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from iirp.errors import IirpError
from iirp.shapes import is_model_shape
from iirp.typing import PathLike

__all__ = [
    "ContractError",
    "ModelContract",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "STAGES",
    "ManifestMismatchError",
    "TensorSpec",
    "StageSpec",
    "Manifest",
    "sha256_file",
    "estimator_stage",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
STAGES = ("feature_extractor", "flow_estimator_1", "flow_estimator_2", "flow_estimator_3", "flow_estimator_4")

Dim = Union[int, str]


class ManifestMismatchError(IirpError):
    """An engine folder does not match its manifest, the input, or this machine."""


class ContractError(IirpError, ValueError):
    """An option contradicts the model grid the model records (its spacing, orientation or intensity rule)."""


@dataclass(frozen=True)
class ModelContract:
    """What a model expects of its input: the grid it was trained on and how intensities were scaled.

    Read from an engine folder's manifest (``model_grid``, ``intensity``) or from a checkpoint's
    record (:attr:`iirp.model.checkpoint.CheckpointInfo.spacing`...), and used by ``iirp-run``
    to build the model grid (:func:`iirp.runtime.geometry.model_grid_for`).

    Attributes:
        size: model grid ``(X, Y, Z)`` in voxels.
        spacing: model grid spacing in mm ``(x, y, z)``.
        orientation: ``DICOMOrient`` code of the model grid (``RAS`` for every model so far).
        intensity: the intensity rule the model was trained with: the default of ``--intensity``.
        recorded: the spacing is the model's own (a manifest, or a checkpoint that records it); a
            run-time spacing that differs then contradicts it. False for a checkpoint that records no
            grid (the released one: 1 mm unless told otherwise).
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    orientation: str = "RAS"
    intensity: str = "minmax"
    recorded: bool = True

    def with_spacing(self, spacing: Optional[Sequence[float]], where: str = "--spacing") -> "ModelContract":
        """This contract with a spacing asked for at run time.

        Raises:
            ContractError: the model records another spacing.
        """
        if spacing is None:
            return self
        asked = tuple(float(v) for v in spacing)
        if len(asked) != 3 or not all(0 < v < float("inf") for v in asked):
            raise ContractError(f"{where} must be 3 positive numbers (mm), got {spacing!r}")
        if self.recorded and any(abs(a - b) > 1e-6 * max(1.0, b) for a, b in zip(asked, self.spacing)):
            raise ContractError(
                f"{where} {_mm(asked)} contradicts the model, which was trained on a {_mm(self.spacing)} grid "
                "(recorded in its manifest or checkpoint); leave it out"
            )
        return ModelContract(self.size, asked, self.orientation, self.intensity, True)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {"size": list(self.size), "spacing": list(self.spacing), "orientation": self.orientation,
                "intensity": self.intensity}


def _mm(spacing: Sequence[float]) -> str:
    values = {float(v) for v in spacing}
    return f"{values.pop():g} mm" if len(values) == 1 else "x".join(f"{float(v):g}" for v in spacing) + " mm"


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def estimator_stage(level: int) -> str:
    """Stage name of the flow estimator of ``level`` (1 = finest)."""
    return f"flow_estimator_{level}"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, shape (ints or symbols) and numpy dtype name."""

    name: str
    shape: list[Dim]
    dtype: str = "float32"

    def resolve(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """Concrete shape for spatial sizes ``{"X": .., "Y": .., "Z": ..}``."""
        out = []
        for dim in self.shape:
            if isinstance(dim, int):
                out.append(dim)
            else:
                symbol, _, divisor = dim.partition("/")
                out.append(sizes[symbol] // int(divisor or 1))
        return tuple(out)


@dataclass(frozen=True)
class StageSpec:
    """One exported stage: its ONNX file, hash and I/O."""

    file: str
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    engine_file: Optional[str] = None
    engine_sha256: Optional[str] = None

    @classmethod
    def from_dict(cls, data: Any, where: str = "stage") -> "StageSpec":
        """Build from the manifest's JSON, checking every field's type.

        Raises:
            ManifestMismatchError: a field is missing or of the wrong type, or a file name is not a
                plain name inside the engine folder.
        """
        data = _expect(data, dict, where)
        engine_file = data.get("engine_file")
        engine_sha256 = data.get("engine_sha256")
        return cls(
            file=_file_name(data.get("file"), f"{where} 'file'"),
            sha256=_digest(data.get("sha256"), f"{where} 'sha256'"),
            inputs=_tensors(data.get("inputs"), f"{where} 'inputs'"),
            outputs=_tensors(data.get("outputs"), f"{where} 'outputs'"),
            engine_file=None if engine_file is None else _file_name(engine_file, f"{where} 'engine_file'"),
            engine_sha256=None if engine_sha256 is None else _digest(engine_sha256, f"{where} 'engine_sha256'"),
        )


_SYMBOL = re.compile(r"^[XYZ](/(1|2|4|8))?$")
#: A ``DICOMOrient`` code: one of R/L, A/P, S/I each, in any order.
_ORIENTATION = re.compile(r"^(?=.*[RL])(?=.*[AP])(?=.*[SI])[RLAPSI]{3}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DTYPES = ("float32", "float16", "int32", "int64")


def _expect(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestMismatchError(f"{where} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _file_name(value: Any, where: str) -> str:
    """A plain file name inside the engine folder: no folders, no ``..``, no absolute path."""
    if not isinstance(value, str) or not _FILE_NAME.match(value) or value in (".", ".."):
        raise ManifestMismatchError(f"{where} must be a plain file name inside the engine folder, got {value!r}")
    return value


def _digest(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _HEX64.match(value):
        raise ManifestMismatchError(f"{where} must be a sha256 hex digest, got {value!r}")
    return value


def _tensors(value: Any, where: str) -> list[TensorSpec]:
    out = []
    for i, item in enumerate(_expect(value, list, where)):
        item = _expect(item, dict, f"{where}[{i}]")
        name = item.get("name")
        shape = item.get("shape")
        dtype = item.get("dtype", "float32")
        if not isinstance(name, str) or not name:
            raise ManifestMismatchError(f"{where}[{i}] 'name' must be a non-empty string, got {name!r}")
        if not isinstance(shape, list) or not all(
            (isinstance(d, int) and not isinstance(d, bool) and d > 0) or (isinstance(d, str) and _SYMBOL.match(d))
            for d in shape
        ):
            raise ManifestMismatchError(
                f"{where}[{i}] 'shape' must list positive ints or X, Y, Z (optionally /2, /4, /8), got {shape!r}"
            )
        if dtype not in _DTYPES:
            raise ManifestMismatchError(f"{where}[{i}] 'dtype' must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        out.append(TensorSpec(name, list(shape), dtype))
    return out


@dataclass
class Manifest:
    """Everything ``manifest.json`` records. See the module docstring for the stage contract.

    Attributes:
        source_sha256: sha256 of the checkpoint the stages were exported from.
        model: channels, ResBlock count, parameter count.
        model_grid: ``size`` (X, Y, Z), ``spacing`` (mm), ``orientation`` (DICOMOrient code).
        precision: ``fp32`` or ``fp16`` (fp16 weights and compute, fp32 I/O).
        opset: ONNX opset.
        dynamic: spatial dims are symbolic; ``dynamic_range`` gives min/max (multiples of 8).
        stages: stage name -> :class:`StageSpec`.
        intensity: default intensity rule.
        iterstop: default ``rule``, ``delta``, ``max_iters``.
        exporter: library versions used for the export.
        tensorrt: ``gpu_name``, ``compute_capability``, ``tensorrt_version``, ``timing_cache``
            when engines were built, else None.
        openvino: ``{"bf16_gate": {...}}``, the bf16 accuracy record of ``iirp-export --verify-pair``
            (:mod:`iirp.export.openvino_gate`), which ``--precision auto`` reads; None without one.
    """

    source_sha256: str
    model: dict[str, Any]
    model_grid: dict[str, Any]
    precision: str
    opset: int
    dynamic: bool
    stages: dict[str, StageSpec]
    intensity: str = "minmax"
    iterstop: dict[str, Any] = field(default_factory=lambda: {"rule": "official", "delta": 0.005, "max_iters": 10})
    dynamic_range: Optional[dict[str, list[int]]] = None
    exporter: dict[str, str] = field(default_factory=dict)
    tensorrt: Optional[dict[str, Any]] = None
    openvino: Optional[dict[str, Any]] = None
    source_path: str = ""
    iirp_version: str = ""
    format_version: int = FORMAT_VERSION

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = "iirp-engines"
        return data

    def save(self, folder: PathLike) -> Path:
        """Write ``manifest.json`` into ``folder`` (atomically); returns its path."""
        from iirp.atomic import write_json

        return write_json(Path(os.fspath(folder)) / MANIFEST_NAME, self.to_dict())

    @classmethod
    def load(cls, folder: PathLike) -> "Manifest":
        """Read ``folder/manifest.json``.

        Raises:
            ManifestMismatchError: missing, not JSON, another format or version, or fields missing.
        """
        path = Path(os.fspath(folder)) / MANIFEST_NAME
        if not path.is_file():
            raise ManifestMismatchError(f"engine folder {folder}: {MANIFEST_NAME} not found (run iirp-export first)")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as err:
            raise ManifestMismatchError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(data, dict) or data.get("format") != "iirp-engines":
            raise ManifestMismatchError(f"{path} is not an iirp engine manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestMismatchError(
                f"{path} has format version {data.get('format_version')}, this iirp reads {FORMAT_VERSION}"
            )
        data.pop("format")
        stages = _expect_field(data, "stages", dict, path)
        data["stages"] = {str(name): StageSpec.from_dict(spec, f"{path}: stage {name!r}")
                          for name, spec in stages.items()}
        _check_fields(data, path)
        try:
            manifest = cls(**data)
        except TypeError as err:
            raise ManifestMismatchError(f"{path} is incomplete or malformed: {err}") from err
        missing = [s for s in STAGES if s not in manifest.stages]
        if missing:
            raise ManifestMismatchError(f"{path} lacks stages {', '.join(missing)}")
        manifest._check_grid(path)
        return manifest

    def _check_grid(self, path: Path) -> None:
        """The model grid is 3 positive multiples of 8 and, for a static export, the stages' own shape.

        Raises:
            ManifestMismatchError: a malformed grid, or one the stage files were not exported for.
        """
        size = self.model_grid.get("size")
        if not is_model_shape(size) or not isinstance(size, list):
            raise ManifestMismatchError(f"{path}: model_grid size must be 3 multiples of 8 (each >= 16), got {size!r}")
        spacing = self.model_grid.get("spacing", [1.0, 1.0, 1.0])
        if not (isinstance(spacing, list) and len(spacing) == 3 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf") for v in spacing)):
            raise ManifestMismatchError(f"{path}: model_grid spacing must be 3 positive numbers (mm), got {spacing!r}")
        orientation = self.model_grid.get("orientation", "RAS")
        if not (isinstance(orientation, str) and _ORIENTATION.match(orientation)):
            raise ManifestMismatchError(
                f"{path}: model_grid orientation must be a code like 'RAS', got {orientation!r}"
            )
        from iirp.runtime.intensity import parse_intensity

        try:
            parse_intensity(self.intensity)
        except IirpError as err:
            raise ManifestMismatchError(f"{path}: 'intensity': {err}") from err
        if self.dynamic_range is not None:
            rng = self.dynamic_range
            if not all(isinstance(rng.get(k), list) and len(rng[k]) == 3 and all(
                    isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in rng[k]) for k in ("min", "max")):
                raise ManifestMismatchError(f"{path}: dynamic_range must give 'min' and 'max' as 3 positive ints")
        for name, stage in self.stages.items():
            if not stage.inputs or not stage.outputs:
                raise ManifestMismatchError(f"{path}: stage {name!r} lists no inputs or no outputs")
        if self.dynamic:
            return
        image = self.stages["feature_extractor"].inputs[0]
        if image.shape[2:] != size:
            raise ManifestMismatchError(
                f"{path}: model_grid size {size} differs from the static shape {image.shape[2:]} the stages "
                "were exported for (manifest edited after export?)"
            )

    # ------------------------------------------------------------------ checks
    def verify_files(self, folder: PathLike, *, engines: bool = False) -> None:
        """Check that every stage file (ONNX, or TensorRT engine with ``engines``) exists and matches its hash.

        Raises:
            ManifestMismatchError: naming the first missing or altered file.
        """
        root = Path(os.fspath(folder))
        real_root = os.path.realpath(root)
        for name, stage in self.stages.items():
            file, digest = (stage.engine_file, stage.engine_sha256) if engines else (stage.file, stage.sha256)
            if file is None:
                raise ManifestMismatchError(
                    f"engine folder {root}: stage {name} has no TensorRT engine (export with --trt)"
                )
            path = root / file
            if not path.is_file():
                raise ManifestMismatchError(f"engine folder {root}: {file} (stage {name}) is missing")
            if os.path.dirname(os.path.realpath(path)) != real_root:
                raise ManifestMismatchError(
                    f"engine folder {root}: {file} (stage {name}) is a link to a file outside the folder"
                )
            if sha256_file(path) != digest:
                raise ManifestMismatchError(
                    f"engine folder {root}: {file} (stage {name}) does not match the manifest's sha256 "
                    "(edited or replaced after export)"
                )

    @property
    def size(self) -> tuple[int, int, int]:
        """Model grid ``(X, Y, Z)``."""
        return tuple(int(s) for s in self.model_grid["size"])  # type: ignore[return-value]

    @property
    def contract(self) -> ModelContract:
        """The model grid and intensity rule this folder's model expects (:class:`ModelContract`)."""
        spacing = tuple(float(v) for v in self.model_grid.get("spacing", (1.0, 1.0, 1.0)))
        return ModelContract(self.size, spacing, str(self.model_grid.get("orientation", "RAS")),  # type: ignore[arg-type]
                             self.intensity, True)

    def source_checkpoint(self, checkpoint: Optional[PathLike] = None) -> Path:
        """The checkpoint this folder was exported from (or ``checkpoint``), its sha256 checked.

        Raises:
            ManifestMismatchError: the checkpoint is missing or is not this folder's source.
        """
        named = os.fspath(checkpoint) if checkpoint is not None else self.source_path
        path = Path(named or "")
        if not named or not path.is_file():
            raise ManifestMismatchError(
                f"the source checkpoint {named!r} of these engines is missing (pass it with --checkpoint)"
            )
        if sha256_file(path) != self.source_sha256:
            raise ManifestMismatchError(f"checkpoint {path} is not the one the engines were exported from "
                                        "(sha256 differs)")
        return path

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        """Check that a model-grid volume of ``shape`` (X, Y, Z) can run on these stages.

        Raises:
            ManifestMismatchError: a static export of another shape, or outside the dynamic range.
        """
        shape = tuple(int(s) for s in shape)
        if not self.dynamic:
            if shape != self.size:
                raise ManifestMismatchError(
                    f"engines were exported for a static shape {self.size}, got {shape}; "
                    "re-export with --shape or --dynamic"
                )
            return
        lo = self.dynamic_range["min"] if self.dynamic_range else [8, 8, 8]
        hi = self.dynamic_range["max"] if self.dynamic_range else [2**31] * 3
        if any(s % 8 for s in shape) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            raise ManifestMismatchError(
                f"shape {shape} is outside the engines' dynamic range {lo}..{hi} (multiples of 8)"
            )


def _expect_field(data: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    if key not in data:
        raise ManifestMismatchError(f"{path} is incomplete or malformed: no {key!r}")
    return _expect(data[key], kind, f"{path}: {key!r}")


#: Manifest fields and the JSON types each may have (None: may be null).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "source_sha256": (str,), "model": (dict,), "model_grid": (dict,), "precision": (str,), "opset": (int,),
    "dynamic": (bool,), "intensity": (str,), "iterstop": (dict,), "dynamic_range": (dict, type(None)),
    "exporter": (dict,), "tensorrt": (dict, type(None)), "source_path": (str,), "iirp_version": (str,),
    "format_version": (int,),
}


def _check_fields(data: dict[str, Any], path: Path) -> None:
    """Every known field present has its JSON type; the required ones are present."""
    for key in ("source_sha256", "model", "model_grid", "precision", "opset", "dynamic"):
        if key not in data:
            raise ManifestMismatchError(f"{path} is incomplete or malformed: no {key!r}")
    for key, kinds in _FIELD_TYPES.items():
        value = data.get(key)
        if key in data and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise ManifestMismatchError(f"{path}: {key!r} must be {names}, got {type(data[key]).__name__}")
    if data["precision"] not in ("fp32", "fp16"):
        raise ManifestMismatchError(f"{path}: 'precision' must be fp32 or fp16, got {data['precision']!r}")
