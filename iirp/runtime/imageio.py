"""Reading inputs with clear errors, and writing image outputs that are checked and atomic.

Any format SimpleITK reads is accepted (NIfTI, NRRD, MHA, ...). Every
problem with an input becomes an :class:`~iirp.errors.ImageError` whose
message names the role (fixed, moving, ...) and the file.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import math
import os
import struct
import sys
import tempfile
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import SimpleITK as sitk

from iirp.atomic import Owned, StagedFolder
from iirp.errors import ImageError, OutputError
from iirp.typing import PathLike

__all__ = [
    "REGISTRATION_OUTPUTS", "MARKER", "NiftiHeader", "parse_nifti_header", "read_image", "read_labels",
    "write_nifti", "check_output_dir", "AtomicOutputDir",
]


_NIFTI1_HEADER_BYTES = 348
_NIFTI2_HEADER_BYTES = 540
#: NIfTI float datatypes whose voxels ITK's reader silently turns from NaN/Inf into 0.
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}
#: NIfTI complex datatypes (complex64, complex128, complex256).
_NIFTI_COMPLEX_TYPES = {32, 1792, 2048}


@dataclass(frozen=True)
class NiftiHeader:
    """The fields of a NIfTI-1 or NIfTI-2 header that say how long the file must be.

    Attributes:
        version: 1 or 2.
        endian: ``"<"`` or ``">"``.
        dims: ``dim[1..dim[0]]``.
        datatype: NIfTI datatype code.
        bitpix: bits per voxel (all components).
        vox_offset: byte offset of the voxel data.
    """

    version: int
    endian: str
    dims: tuple[int, ...]
    datatype: int
    bitpix: int
    vox_offset: int

    @property
    def count(self) -> int:
        """Voxels (times components) the data holds."""
        return int(np.prod([max(d, 1) for d in self.dims], dtype=np.int64))

    @property
    def file_size(self) -> int:
        """Bytes of a complete single-file NIfTI (``.nii``) with this header."""
        return self.vox_offset + self.count * self.bitpix // 8


def parse_nifti_header(raw: bytes, where: str) -> Optional[NiftiHeader]:
    """The header of a single-file NIfTI (``.nii``) from its first bytes; None if ``raw`` is not one.

    Args:
        raw: the file's bytes (at least the header), uncompressed.
        where: how messages name the file, e.g. ``"fixed image a.nii.gz"``.

    Returns:
        The header, or None when the first four bytes are neither 348 nor 540 in either byte
        order (not NIfTI: left to SimpleITK) or the file is shorter than its header.

    Raises:
        ImageError: a NIfTI-sized header whose magic is not ``n+1``/``n+2`` (ITK would read it as
            Analyze 7.5 and drop the origin and direction), or whose dimensions, datatype or voxel
            offset are impossible.
    """
    if len(raw) < 4:
        return None
    for endian in "<>":
        size = struct.unpack(endian + "i", raw[:4])[0]
        if size in (_NIFTI1_HEADER_BYTES, _NIFTI2_HEADER_BYTES) and len(raw) >= size:
            break
    else:
        return None
    if size == _NIFTI1_HEADER_BYTES:
        magic, expected_magic = raw[344:348], b"n+1\x00"
        ndim, *dims = struct.unpack(endian + "8h", raw[40:56])
        datatype, bitpix = struct.unpack(endian + "2h", raw[70:74])
        offset = struct.unpack(endian + "f", raw[108:112])[0]
        version = 1
    else:
        magic, expected_magic = raw[4:12], b"n+2\x00\r\n\x1a\n"
        datatype, bitpix = struct.unpack(endian + "2h", raw[12:16])
        ndim, *dims = struct.unpack(endian + "8q", raw[16:80])
        offset = struct.unpack(endian + "q", raw[168:176])[0]
        version = 2
    if magic != expected_magic:
        raise ImageError(
            f"cannot read {where}: not a single-file NIfTI-{version} (magic {magic!r}, expected {expected_magic!r}); "
            "it would be read as Analyze 7.5, losing its origin and direction"
        )
    if not (1 <= ndim <= 7 and bitpix > 0 and math.isfinite(offset) and offset >= size
            and all(d >= 0 for d in dims[:ndim])):
        raise ImageError(
            f"cannot read {where}: impossible NIfTI header (dim {[ndim, *dims]}, bitpix {bitpix}, vox_offset {offset})"
        )
    return NiftiHeader(version, endian, tuple(int(d) for d in dims[:ndim]), int(datatype), int(bitpix), int(offset))


def _nifti_raw_check(path: Path, role: str) -> None:
    """Checks ITK's NIfTI reader skips: a wrong magic (read as Analyze), truncated voxel data
    (read as zeros), NaN/Inf (read as 0), complex voxels.

    Only single-file NIfTI (``.nii``, ``.nii.gz``) is checked; anything else returns.

    Raises:
        ImageError: the file is corrupt, truncated, complex or holds non-finite voxels.
    """
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return
    opener = gzip.open if name.endswith(".gz") else open
    where = f"{role} image {path}"
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ImageError(f"cannot read {where}: truncated or corrupt compressed data") from err
    header = parse_nifti_header(raw, where)
    if header is None:
        return  # not NIfTI, or a short header: SimpleITK reports it
    if len(raw) < header.file_size:
        raise ImageError(
            f"cannot read {where}: truncated (voxel data {max(len(raw) - header.vox_offset, 0)} of "
            f"{header.file_size - header.vox_offset} bytes)"
        )
    if header.datatype in _NIFTI_COMPLEX_TYPES:
        raise ImageError(f"{where} must be a real-valued image, got complex voxels (NIfTI datatype {header.datatype})")
    if header.datatype in _NIFTI_FLOAT_TYPES:
        values = np.frombuffer(raw, dtype=header.endian + _NIFTI_FLOAT_TYPES[header.datatype], count=header.count,
                               offset=header.vox_offset)
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise ImageError(f"{role} image {path} has NaN/Inf values in {bad} voxel(s)")


@contextlib.contextmanager
def c_stderr_to_log() -> Iterator[None]:
    """Send what C libraries print on file descriptor 2 during the block to the ``iirp.itk`` logger.

    ITK's NIfTI library (niftilib) reports read and write problems with ``fprintf(stderr, ...)``,
    bypassing ITK's own logger; the toolkit reports them itself, as one line. The main thread only
    (the descriptor is process-wide); elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace").strip()
            if text:
                logging.getLogger("iirp.itk").warning(text)


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


#: Largest deviation of ``D^T D`` from the identity that still counts as orthonormal direction cosines
#: (text formats store 6 to 8 digits; a sheared grid is off by far more).
DIRECTION_TOLERANCE = 1e-3
_COMPLEX_PIXELS = {sitk.sitkComplexFloat32, sitk.sitkComplexFloat64}


def _check_geometry(image: sitk.Image, where: str) -> None:
    """Spacing positive and finite, origin finite, direction cosines orthonormal.

    Raises:
        ImageError: otherwise. A sheared (non-orthonormal) grid is refused rather than resampled:
            ITK would coerce it to orthogonal on writing, putting the outputs on another grid.
    """
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise ImageError(f"{where} has an invalid voxel spacing {tuple(spacing)} (must be positive and finite)")
    if not np.isfinite(origin).all():
        raise ImageError(f"{where} has a non-finite origin {tuple(origin)}")
    if not np.isfinite(direction).all():
        raise ImageError(f"{where} has non-finite direction cosines")
    deviation = float(np.abs(direction.T @ direction - np.eye(3)).max())
    if deviation > DIRECTION_TOLERANCE:
        raise ImageError(
            f"{where} has sheared (non-orthonormal) direction cosines (|D^T D - I| = {deviation:.3g}); "
            "resample it onto an orthogonal grid first"
        )


def _read(path: PathLike, role: str) -> sitk.Image:
    p = Path(os.fspath(path))
    where = f"{role} image {p}"
    if not p.exists():
        raise ImageError(f"{role} image not found: {p}")
    if not p.is_file():
        raise ImageError(f"{role} image is not a file: {p}")
    _nifti_raw_check(p, role)
    try:
        with c_stderr_to_log():
            image = sitk.ReadImage(str(p))
    except RuntimeError as err:
        raise ImageError(f"cannot read {where}: {_reader_reason(err)}") from err
    except MemoryError as err:
        raise ImageError(f"cannot read {where}: too large for this machine's memory") from err
    if image.GetDimension() != 3:
        raise ImageError(f"{where} must be 3D, got {image.GetDimension()}D (size {image.GetSize()})")
    if image.GetPixelID() in _COMPLEX_PIXELS:
        raise ImageError(f"{where} must be a real-valued image, got {image.GetPixelIDTypeAsString()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(
            f"{where} must be scalar, got {image.GetNumberOfComponentsPerPixel()} components per voxel"
            f" ({image.GetPixelIDTypeAsString()})"
        )
    if min(image.GetSize()) < 2:
        raise ImageError(f"{where} must have at least 2 voxels per axis, got size {image.GetSize()}")
    _check_geometry(image, where)
    return image


def read_image(path: PathLike, role: str) -> sitk.Image:
    """Read a 3D scalar intensity image as float32.

    Raises:
        ImageError: missing, unreadable, not 3D, not a real scalar, sheared, NaN/Inf voxels, or constant.
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
        ImageError: missing, unreadable, not 3D, not a real scalar, sheared, or NaN/Inf labels.
    """
    image = _read(path, role)
    values = sitk.GetArrayViewFromImage(image)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ImageError(f"{role} label map {path} has NaN/Inf voxels")
    return image


#: The files ``iirp-run`` writes into an output folder (report.json, the commit marker, last).
REGISTRATION_OUTPUTS = frozenset(
    {"warped.nii.gz", "displacement.nii.gz", "warped_seg.nii.gz", "affine.tfm", "qc.png", "report.json"}
)
#: The file published last: a folder without it is incomplete.
MARKER = "report.json"
_INTEGER_PIXELS = {sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32,
                   sitk.sitkUInt64, sitk.sitkInt64}


def write_nifti(path: str, image: sitk.Image, *, compress: bool = True, threads: Optional[int] = None) -> int:
    """Write ``image`` as a NIfTI file at ``path`` and check that every byte arrived.

    SimpleITK's writer does not report a short write (disk full, file-size limit), so it writes
    an uncompressed ``.nii`` whose size is checked against its own header; with ``compress`` that
    file is then gzip-compressed on ``threads`` cores (:func:`iirp.deflate.gzip_file`: one gzip
    member, Python I/O raising on every failed write; run-length deflate for float images, the
    default strategy for integer label maps, both at level 1) and removed. The decompressed bytes
    are exactly what SimpleITK writes, so every NIfTI reader reads the same image.

    Args:
        path: the target file (``.nii.gz`` with ``compress``, else ``.nii``).
        image: any image SimpleITK writes as NIfTI.
        compress: gzip the file.
        threads: compressing threads (default: the usable cores).

    Returns:
        The size in bytes of the file at ``path``.

    Raises:
        OSError: a write failed (the caller maps it to OutputError).
        OutputError: SimpleITK could not write, or its file is short.
    """
    from iirp.deflate import FLOAT_STRATEGY, LABEL_STRATEGY, gzip_file

    plain = path[: -len(".gz")] if compress and path.endswith(".gz") else path + (".nii" if compress else "")
    try:
        with c_stderr_to_log():
            sitk.WriteImage(image, plain, useCompression=False)
    except RuntimeError as err:
        raise OutputError(f"cannot write {os.path.basename(path)}: {_reader_reason(err)}") from err
    try:
        with open(plain, "rb") as fh:
            header = parse_nifti_header(fh.read(_NIFTI2_HEADER_BYTES), os.path.basename(path))
        size = os.stat(plain).st_size
        if header is None or size != header.file_size:
            expected = header.file_size if header is not None else "a NIfTI header"
            raise OutputError(
                f"cannot write {os.path.basename(path)}: short write ({size} of {expected} bytes; "
                "disk full or size limit?)"
            )
        if not compress:
            return size
        level, strategy = LABEL_STRATEGY if image.GetPixelID() in _INTEGER_PIXELS else FLOAT_STRATEGY
        return gzip_file(plain, path, level=level, strategy=strategy, threads=threads)
    finally:
        if compress and os.path.exists(plain):
            os.remove(plain)


def check_output_dir(path: PathLike, *, overwrite: bool = False, owned: Owned | None = None,
                     role: str = "output folder") -> Path:
    """Check that ``path`` can take the outputs before any work; see :func:`iirp.atomic.check_output_folder`.

    ``owned`` defaults to nothing (no emptiness check); pass :data:`REGISTRATION_OUTPUTS` for a
    registration's folder.
    """
    from iirp.atomic import check_output_folder

    return check_output_folder(path, overwrite=overwrite, owned=owned, role=role)


class AtomicOutputDir(StagedFolder):
    """A registration's outputs, all or nothing: :class:`iirp.atomic.StagedFolder` plus NIfTI images.

    Usage::

        with AtomicOutputDir(out) as stage:
            stage.write_image("warped.nii.gz", image)
            stage.write_json("report.json", report)

    ``report.json`` is published last. With ``overwrite`` the previous run's files
    (:data:`REGISTRATION_OUTPUTS`) are replaced as a set.
    """

    def __init__(self, path: PathLike, *, overwrite: bool = False) -> None:
        super().__init__(path, marker=MARKER, overwrite=overwrite, replaceable=REGISTRATION_OUTPUTS)

    def write_image(self, name: str, image: sitk.Image, *, compress: bool = True) -> Path:
        """Stage ``image`` as NIfTI (:func:`write_nifti`); returns its final path."""
        return self.write(name, lambda p: write_nifti(p, image, compress=compress))

    def write_with(self, name: str, writer: Callable[[str], Any]) -> Path:
        """Stage ``name`` by ``writer(staged_path)``; returns its final path."""

        def _write(staged: str) -> None:
            writer(staged)

        return self.write(name, _write)
