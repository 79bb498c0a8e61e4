"""Image geometry and the conventions every module follows (matching SPEC.md).

Conventions, stated once:

* Network tensors are ``(N, C, X, Y, Z)`` and numpy volumes ``(X, Y, Z)``: the
  image's own index axes i, j, k in the order a NIfTI file stores them.
  SimpleITK's ``GetArrayFromImage`` returns ``(z, y, x)``;
  :func:`array_from_image` / :func:`image_from_array` transpose once, here.
* Flows are ``(3, X, Y, Z)`` (or ``(N, 3, X, Y, Z)``) float32 displacements in
  voxels of their own grid; component c moves along array axis c (i, j, k).
  No component is ever flipped. Upsampling a flow scales its vectors.
* SimpleITK ``size``, ``spacing`` and ``origin`` are ``(x, y, z)`` = (i, j, k);
  numpy extents are called ``shape``.
* Every sampler uses ``align_corners=True`` semantics (voxel centres at integer
  indices) and zero padding.
* Physical output fields follow ITK: millimetres, LPS, on the fixed image's
  own grid, mapping a fixed point x to the moving point x + u(x).

The model grid is the grid the network sees: the checkpoint's input size,
1 mm spacing by default, and the orientation ``RAS`` (SimpleITK
``DICOMOrient`` code: increasing i points to the Right, j Anterior, k
Superior; an identity NIfTI affine).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk

__all__ = [
    "MODEL_ORIENTATION",
    "ModelGrid",
    "array_from_image",
    "image_from_array",
    "orient",
    "orientation_code",
    "orientation_direction",
    "foreground_center",
    "foreground_mask",
    "model_grid_for",
    "same_grid",
]

#: Orientation of the released model's input, as a ``sitk.DICOMOrient`` code.
MODEL_ORIENTATION = "RAS"
_SPACING_TOL = 1e-3  # mm: spacings closer than this count as equal
_GRID_TOL = 1e-4


@dataclass(frozen=True)
class ModelGrid:
    """A 3D sampling grid in physical space (ITK conventions, LPS mm).

    Attributes:
        size: voxels ``(x, y, z)`` = array shape ``(X, Y, Z)``.
        spacing: mm per voxel ``(x, y, z)``.
        origin: physical position (mm, LPS) of voxel (0, 0, 0).
        direction: 3x3 direction cosines, row-major (ITK ``GetDirection``).
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "ModelGrid":
        """The grid of an existing image."""
        return cls(
            tuple(int(s) for s in image.GetSize()),  # type: ignore[arg-type]
            tuple(float(s) for s in image.GetSpacing()),  # type: ignore[arg-type]
            tuple(float(s) for s in image.GetOrigin()),  # type: ignore[arg-type]
            tuple(float(s) for s in image.GetDirection()),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(X, Y, Z)`` of a volume on this grid."""
        return self.size

    def direction_matrix(self) -> np.ndarray:
        """``(3, 3)`` float64; column c is the physical direction of index axis c."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def index_to_physical_matrix(self) -> np.ndarray:
        """``(3, 3)`` float64 ``D @ diag(spacing)``: mm per voxel step along each axis."""
        return self.direction_matrix() * np.asarray(self.spacing)[None, :]

    def reference_image(self, pixel_id: int = sitk.sitkFloat32) -> sitk.Image:
        """An empty image with this grid (for ``sitk.Resample``)."""
        image = sitk.Image([int(s) for s in self.size], pixel_id)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        return {k: list(v) for k, v in asdict(self).items()}


def array_from_image(image: sitk.Image, dtype: type | None = np.float32) -> np.ndarray:
    """Scalar image -> ``(X, Y, Z)`` array in index (i, j, k) order (a copy)."""
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    return np.ascontiguousarray(array if dtype is None else array.astype(dtype, copy=False))


def image_from_array(array: np.ndarray, reference: sitk.Image | ModelGrid) -> sitk.Image:
    """``(X, Y, Z)`` scalar or ``(X, Y, Z, C)`` vector array -> image on ``reference``'s grid."""
    grid = reference if isinstance(reference, ModelGrid) else ModelGrid.of(reference)
    if tuple(array.shape[:3]) != grid.size:
        raise ValueError(f"image_from_array() 'array' must have shape {grid.size}(+C), got {array.shape}")
    is_vector = array.ndim == 4
    axes = (2, 1, 0, 3) if is_vector else (2, 1, 0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(axes)), isVector=is_vector)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    return image


def orientation_code(item: sitk.Image | ModelGrid) -> str:
    """The orientation code (ITK's DICOM convention, e.g. ``RAS``) of an image's or a grid's direction cosines."""
    direction = item.direction if isinstance(item, ModelGrid) else item.GetDirection()
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(direction)


def orient(image: sitk.Image, code: str = MODEL_ORIENTATION) -> sitk.Image:
    """Lossless reorientation (axis permutation and flips only) to ``code``; physically the same image."""
    if orientation_code(image) == code:
        return image
    return sitk.DICOMOrient(image, code)


def orientation_direction(code: str = MODEL_ORIENTATION) -> tuple[float, ...]:
    """Direction cosines (row-major 3x3) of an axis-aligned grid with orientation ``code``."""
    probe = sitk.Image([2, 2, 2], sitk.sitkUInt8)
    return tuple(float(v) for v in sitk.DICOMOrient(probe, code).GetDirection())


def foreground_mask(image: sitk.Image) -> sitk.Image:
    """The voxels above background (uint8 1), on ``image``'s grid.

    Background is separated from foreground by Otsu's threshold, which works
    for skull-stripped MR (0 background), raw MR (noisy air) and CT (air at
    -1000 HU) alike.
    """
    return sitk.OtsuThreshold(sitk.Cast(image, sitk.sitkFloat32), 0, 1)


def foreground_center(image: sitk.Image) -> np.ndarray:
    """Physical centre (mm, LPS) of the voxels above background (:func:`foreground_mask`).

    Falls back to the image centre if nothing is above it.
    """
    mask = foreground_mask(image)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    if stats.HasLabel(1):
        return np.asarray(stats.GetCentroid(1), dtype=np.float64)
    centre_index = [(s - 1) / 2.0 for s in image.GetSize()]
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(centre_index), dtype=np.float64)


def same_grid(a: sitk.Image | ModelGrid, b: sitk.Image | ModelGrid) -> bool:
    """True when two grids have the same size and (within tolerance) spacing, origin and direction."""
    ga = a if isinstance(a, ModelGrid) else ModelGrid.of(a)
    gb = b if isinstance(b, ModelGrid) else ModelGrid.of(b)
    return (
        ga.size == gb.size
        and np.allclose(ga.spacing, gb.spacing, atol=_GRID_TOL)
        and np.allclose(ga.origin, gb.origin, atol=_GRID_TOL)
        and np.allclose(ga.direction, gb.direction, atol=_GRID_TOL)
    )


def model_grid_for(
    oriented_fixed: sitk.Image,
    size: tuple[int, int, int],
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    code: str = MODEL_ORIENTATION,
) -> tuple[ModelGrid, bool]:
    """The model grid for a fixed image already brought to ``code`` by :func:`orient`.

    If the fixed image has the model's size and spacing, its own grid is the
    model grid (voxel for voxel, no resampling). Otherwise the grid is
    axis-aligned in ``code``, ``size`` voxels of ``spacing`` mm, centred on the
    fixed image's foreground.

    Returns:
        ``(grid, voxel_for_voxel)``.
    """
    if tuple(oriented_fixed.GetSize()) == tuple(size) and np.allclose(
        oriented_fixed.GetSpacing(), spacing, atol=_SPACING_TOL
    ):
        return ModelGrid.of(oriented_fixed), True
    direction = orientation_direction(code)
    centre = foreground_center(oriented_fixed)
    half_extent = (np.asarray(direction).reshape(3, 3) * np.asarray(spacing)[None, :]) @ (
        (np.asarray(size, dtype=np.float64) - 1.0) / 2.0
    )
    origin = centre - half_extent
    grid = ModelGrid(
        tuple(int(s) for s in size),  # type: ignore[arg-type]
        tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        tuple(float(o) for o in origin),  # type: ignore[arg-type]
        direction,
    )
    return grid, False
