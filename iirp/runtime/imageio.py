"""Reading inputs with clear errors, and writing outputs atomically.

Any format SimpleITK reads is accepted (NIfTI, NRRD, MHA, ...). Every
problem with an input becomes an :class:`~iirp.errors.ImageError` whose
message names the role (fixed, moving, ...) and the file.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk

from iirp.errors import ImageError, OutputError
from iirp.typing import PathLike

__all__ = ["read_image", "read_labels", "check_output_dir", "AtomicOutputDir"]


_NIFTI1_HEADER_BYTES = 348
#: NIfTI-1 float datatypes whose voxels ITK's reader silently turns from NaN/Inf into 0.
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def _nifti_raw_check(path: Path, role: str) -> None:
    """Checks ITK's NIfTI reader skips: truncated voxel data (read as zeros) and NaN/Inf (read as 0).

    Only NIfTI-1 files (``.nii``, ``.nii.gz``) are checked; anything else returns.

    Raises:
        ImageError: the file is truncated or holds non-finite voxels.
    """
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ImageError(f"cannot read {role} image {path}: truncated or corrupt compressed data") from err
    if len(raw) < _NIFTI1_HEADER_BYTES:
        return  # SimpleITK reports a short header itself
    for endian in "<>":
        if struct.unpack(endian + "i", raw[:4])[0] == _NIFTI1_HEADER_BYTES:
            break
    else:
        return  # NIfTI-2 or not NIfTI: left to SimpleITK
    dims = struct.unpack(endian + "8h", raw[40:56])
    datatype, bitpix = struct.unpack(endian + "2h", raw[70:74])
    vox_offset = int(struct.unpack(endian + "f", raw[108:112])[0])
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        return
    count = int(np.prod([max(d, 1) for d in dims[1 : dims[0] + 1]], dtype=np.int64))
    expected = vox_offset + count * bitpix // 8
    if len(raw) < expected:
        raise ImageError(
            f"cannot read {role} image {path}: truncated (voxel data {len(raw) - vox_offset} of "
            f"{expected - vox_offset} bytes)"
        )
    if datatype in _NIFTI_FLOAT_TYPES:
        values = np.frombuffer(raw, dtype=endian + _NIFTI_FLOAT_TYPES[datatype], count=count, offset=vox_offset)
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise ImageError(f"{role} image {path} has NaN/Inf values in {bad} voxel(s)")


def _reader_reason(err: RuntimeError) -> str:
    """The informative line of a SimpleITK reader exception."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for line in lines:
        if "Description:" in line:
            return line.split("Description:", 1)[1].strip()
    for line in lines:
        if "ERROR:" in line:
            return line.split("ERROR:", 1)[1].strip()
    return "unreadable or corrupt"


def _read(path: PathLike, role: str) -> sitk.Image:
    p = Path(os.fspath(path))
    if not p.exists():
        raise ImageError(f"{role} image not found: {p}")
    if not p.is_file():
        raise ImageError(f"{role} image is not a file: {p}")
    _nifti_raw_check(p, role)
    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as err:
        raise ImageError(f"cannot read {role} image {p}: {_reader_reason(err)}") from err
    if image.GetDimension() != 3:
        raise ImageError(f"{role} image {p} must be 3D, got {image.GetDimension()}D (size {image.GetSize()})")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(
            f"{role} image {p} must be scalar, got {image.GetNumberOfComponentsPerPixel()} components per voxel"
        )
    if min(image.GetSize()) < 2:
        raise ImageError(f"{role} image {p} must have at least 2 voxels per axis, got size {image.GetSize()}")
    return image


def read_image(path: PathLike, role: str) -> sitk.Image:
    """Read a 3D scalar intensity image as float32.

    Raises:
        ImageError: missing, unreadable, not 3D, not scalar, NaN/Inf voxels, or constant.
    """
    image = sitk.Cast(_read(path, role), sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(values)
    if not finite.all():
        raise ImageError(f"{role} image {path} has NaN/Inf values in {int((~finite).sum())} voxel(s)")
    if float(values.max()) == float(values.min()):
        raise ImageError(f"{role} image {path} is empty or constant (every voxel is {float(values.min())})")
    return image


def read_labels(path: PathLike, role: str) -> sitk.Image:
    """Read a 3D label map, keeping its pixel type.

    Raises:
        ImageError: missing, unreadable, not 3D, not scalar, or NaN/Inf labels.
    """
    image = _read(path, role)
    values = sitk.GetArrayViewFromImage(image)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ImageError(f"{role} label map {path} has NaN/Inf voxels")
    return image


def check_output_dir(path: PathLike) -> Path:
    """Check that ``path`` is, or can be created as, a writable folder. Creates nothing.

    Raises:
        OutputError: a file is in the way or a parent is not writable.
    """
    p = Path(os.fspath(path)).absolute()
    if p.exists():
        if not p.is_dir():
            raise OutputError(f"output folder {p} exists and is not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise OutputError(f"output folder {p} is not writable")
        return p
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"output folder {p} cannot be created: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {p} cannot be created: {parent} is not writable")
    return p


class AtomicOutputDir:
    """Stage output files in a hidden folder, then move them into place together.

    Usage::

        with AtomicOutputDir(out) as stage:
            stage.write_image("warped.nii.gz", image)
            stage.write_json("report.json", report)

    On normal exit every staged file is renamed into ``out`` (created if
    needed); on an exception the staging folder is removed and ``out`` is left
    as it was (a folder created for this run is removed again).
    """

    def __init__(self, path: PathLike) -> None:
        self.path = check_output_dir(path)
        self._created = False
        self._stage: Path | None = None
        self._names: list[str] = []

    def __enter__(self) -> "AtomicOutputDir":
        if not self.path.exists():
            try:
                self.path.mkdir(parents=True)
            except OSError as err:
                raise OutputError(f"output folder {self.path} cannot be created: {err.strerror}") from err
            self._created = True
        try:
            self._stage = Path(tempfile.mkdtemp(prefix=".iirp-partial-", dir=self.path))
        except OSError as err:
            self._cleanup()
            raise OutputError(f"output folder {self.path} is not writable: {err.strerror}") from err
        return self

    def _target(self, name: str) -> Path:
        assert self._stage is not None, "use AtomicOutputDir as a context manager"
        self._names.append(name)
        return self._stage / name

    def write_with(self, name: str, writer: Callable[[str], Any]) -> Path:
        """Stage ``name`` by calling ``writer(staged_path)``; returns its final path."""
        writer(str(self._target(name)))
        return self.path / name

    def write_image(self, name: str, image: sitk.Image) -> Path:
        return self.write_with(name, lambda p: sitk.WriteImage(image, p, useCompression=True))

    def write_json(self, name: str, payload: Any) -> Path:
        def _dump(p: str) -> None:
            with open(p, "w") as fh:
                json.dump(payload, fh, indent=2)
                fh.write("\n")

        return self.write_with(name, _dump)

    def _cleanup(self) -> None:
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
        if self._created:
            shutil.rmtree(self.path, ignore_errors=True)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self._cleanup()
            return
        assert self._stage is not None
        for name in self._names:
            os.replace(self._stage / name, self.path / name)
        shutil.rmtree(self._stage, ignore_errors=True)
