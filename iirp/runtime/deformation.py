"""From a model-grid flow to outputs on the fixed image's own grid.

The network's flow ``phi`` is ``(3, X, Y, Z)`` in voxels of the model grid
(see :mod:`iirp.runtime.geometry`): model voxel p of the fixed image
corresponds to model voxel p + phi(p) of the moving image as resampled on the
model grid. When a pre-alignment T (fixed -> moving points) was used to
resample the moving image, the full map from a fixed point x to the moving
point is ``x -> T(x + d(x))`` with ``d = D diag(spacing) phi`` in mm; the
output field is ``u(x) = T(x + d(x)) - x`` on the fixed image's grid.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from iirp.runtime.geometry import ModelGrid, image_from_array, same_grid

__all__ = [
    "flow_to_physical",
    "displacement_field",
    "apply_field",
    "jacobian_determinant",
    "folding_fraction",
]


def flow_to_physical(flow: np.ndarray, grid: ModelGrid) -> sitk.Image:
    """Voxel flow ``(3, X, Y, Z)`` on ``grid`` -> float64 vector image of mm (LPS) displacements."""
    if flow.shape != (3, *grid.shape):
        raise ValueError(f"flow_to_physical() 'flow' must have shape (3, {grid.shape}), got {flow.shape}")
    mm = np.einsum("pc,cxyz->xyzp", grid.index_to_physical_matrix(), flow.astype(np.float64))
    return image_from_array(mm, grid)


def displacement_field(
    flow: np.ndarray, grid: ModelGrid, fixed: sitk.Image, pre_alignment: sitk.Transform | None = None
) -> sitk.Image:
    """The ITK displacement field on ``fixed``'s grid: float64 3-vector image, mm, LPS.

    Outside the model grid the deformable part is zero (only the pre-alignment acts).

    Args:
        flow: ``(3, X, Y, Z)`` float32 model-grid flow in voxels.
        grid: the model grid.
        fixed: any image on the fixed image's own grid (only its geometry is used).
        pre_alignment: fixed -> moving transform the moving image was resampled with, or None.
    """
    physical = flow_to_physical(flow, grid)
    if not same_grid(grid, fixed):
        physical = sitk.Resample(
            physical, fixed, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64
        )
    if pre_alignment is None:
        physical.CopyInformation(fixed)
        return physical
    # CompositeTransform applies its last transform first: x -> T(x + d(x)).
    composite = sitk.CompositeTransform([pre_alignment, sitk.DisplacementFieldTransform(physical)])
    return sitk.TransformToDisplacementField(
        composite,
        sitk.sitkVectorFloat64,
        fixed.GetSize(),
        fixed.GetOrigin(),
        fixed.GetSpacing(),
        fixed.GetDirection(),
    )


def apply_field(moving: sitk.Image, fixed: sitk.Image, field: sitk.Image, labels: bool = False) -> sitk.Image:
    """Resample ``moving`` onto ``fixed``'s grid through ``field`` (zero outside).

    Intensities are interpolated linearly into float32; label maps (``labels=True``)
    by nearest neighbour, keeping their pixel type.
    """
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))  # takes a copy
    if labels:
        return sitk.Resample(moving, fixed, transform, sitk.sitkNearestNeighbor, 0, moving.GetPixelID())
    return sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def jacobian_determinant(field: sitk.Image) -> sitk.Image:
    """Jacobian determinant of ``x -> x + u(x)`` for an ITK displacement field (physical, mm).

    SimpleITK's Jacobian filter differentiates along index axes (scaled by
    spacing) and ignores the direction matrix D, so the vectors are first
    rotated into the index frame: det(I + D^T grad(u) D) = det(I + grad(u)).

    Returns:
        A float64 scalar image on the field's grid (1 = volume kept, <= 0 = folding).
    """
    direction = ModelGrid.of(field).direction_matrix()
    vectors = sitk.GetArrayViewFromImage(field).astype(np.float64) @ direction  # per voxel: D^T u
    in_index_frame = sitk.GetImageFromArray(vectors, isVector=True)
    in_index_frame.CopyInformation(field)
    return sitk.Cast(sitk.DisplacementFieldJacobianDeterminant(in_index_frame), sitk.sitkFloat64)


def folding_fraction(field: sitk.Image) -> float:
    """Share of voxels whose Jacobian determinant (:func:`jacobian_determinant`) is <= 0."""
    return float((sitk.GetArrayFromImage(jacobian_determinant(field)) <= 0).mean())
