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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from iirp.errors import IirpError
from iirp.typing import PathLike

__all__ = [
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
    def from_dict(cls, data: dict[str, Any]) -> "StageSpec":
        return cls(
            file=data["file"],
            sha256=data["sha256"],
            inputs=[TensorSpec(**t) for t in data["inputs"]],
            outputs=[TensorSpec(**t) for t in data["outputs"]],
            engine_file=data.get("engine_file"),
            engine_sha256=data.get("engine_sha256"),
        )


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
        path = Path(os.fspath(folder)) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

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
        except (OSError, ValueError) as err:
            raise ManifestMismatchError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(data, dict) or data.get("format") != "iirp-engines":
            raise ManifestMismatchError(f"{path} is not an iirp engine manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestMismatchError(
                f"{path} has format version {data.get('format_version')}, this iirp reads {FORMAT_VERSION}"
            )
        data.pop("format")
        try:
            data["stages"] = {name: StageSpec.from_dict(s) for name, s in data["stages"].items()}
            manifest = cls(**data)
        except (KeyError, TypeError) as err:
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
        if not (isinstance(size, list) and len(size) == 3 and all(isinstance(s, int) and s > 0 and s % 8 == 0
                                                                   for s in size)):
            raise ManifestMismatchError(f"{path}: model_grid size must be 3 positive multiples of 8, got {size!r}")
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
        for name, stage in self.stages.items():
            file, digest = (stage.engine_file, stage.engine_sha256) if engines else (stage.file, stage.sha256)
            if file is None:
                raise ManifestMismatchError(
                    f"engine folder {root}: stage {name} has no TensorRT engine (export with --trt)"
                )
            path = root / file
            if not path.is_file():
                raise ManifestMismatchError(f"engine folder {root}: {file} (stage {name}) is missing")
            if sha256_file(path) != digest:
                raise ManifestMismatchError(
                    f"engine folder {root}: {file} (stage {name}) does not match the manifest's sha256 "
                    "(edited or replaced after export)"
                )

    @property
    def size(self) -> tuple[int, int, int]:
        """Model grid ``(X, Y, Z)``."""
        return tuple(int(s) for s in self.model_grid["size"])  # type: ignore[return-value]

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
