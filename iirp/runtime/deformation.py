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

from typing import Optional

import numpy as np
import SimpleITK as sitk

from iirp.runtime.geometry import (
    ModelGrid,
    array_from_image,
    image_from_array,
    orient,
    orientation_code,
    same_grid,
)

__all__ = [
    "flow_to_physical",
    "displacement_field",
    "warp_on_model_grid",
    "apply_field",
    "jacobian_determinant",
    "folding_fraction",
    "folding_fraction_of_flow",
    "is_reoriented_grid",
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
        physical = _reoriented(physical, fixed) or sitk.Resample(
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


def _reoriented(image: sitk.Image, reference: sitk.Image) -> Optional[sitk.Image]:
    """``image`` losslessly reoriented (axes permuted and flipped) onto ``reference``'s grid, or None when that
    does not land exactly on it (then only resampling can)."""
    out = orient(image, orientation_code(reference))
    if not same_grid(out, reference):
        return None
    out.CopyInformation(reference)  # equal within _GRID_TOL: take the reference's exact numbers
    return out


def warp_on_model_grid(image: sitk.Image, flow: np.ndarray, grid: ModelGrid, reference: sitk.Image,
                       labels: bool = False) -> Optional[sitk.Image]:
    """``image`` warped by the model-grid ``flow`` with the project's kernels, on ``reference``'s grid; or None.

    The fast path of :func:`apply_field` for the common case: the model grid is the fixed image's own
    grid and the image lies on it too (both up to a lossless reorientation), with no pre-alignment.
    The result is what resampling through the displacement field gives (:func:`apply_field`, and
    ITK or ANTs from the written field), by ITK's rules (:mod:`iirp.kernels.resample`): intensities
    linearly into float32, labels by nearest neighbour in their own pixel type. Sampling runs in the
    image's stored axis order, as ITK's does, so ties round the same way.

    Args:
        image: the moving image or label map, as read.
        flow: ``(3, X, Y, Z)`` float32 model-grid flow in voxels.
        grid: the model grid.
        reference: the fixed image (only its geometry is used).
        labels: nearest-neighbour label warp instead of trilinear.

    Returns:
        The warped image on ``reference``'s grid, or None when ``image`` or ``reference`` is not on the
        model grid (:func:`apply_field` then resamples through the field).
    """
    from iirp.kernels.resample import warp_image, warp_labels

    if not (same_grid(orient(image, orientation_code(grid)), grid) and is_reoriented_grid(grid, reference)):
        return None
    array = array_from_image(image, dtype=None if labels else np.float32)  # in the image's own axis order
    if labels and array.dtype.kind not in "iu":
        return None
    # sample in the image's stored index space, as ITK does (ties round up, and edges hold, along the stored
    # axes): the flow, reordered and sign-flipped onto those axes, exactly
    stored_flow = _flow_on_axes_of(flow, grid, image)
    warped = warp_labels(array, stored_flow) if labels else warp_image(array, stored_flow)
    return _reoriented(image_from_array(warped, image), reference)


def _flow_on_axes_of(flow: np.ndarray, grid: ModelGrid, image: sitk.Image) -> np.ndarray:
    """The ``(3, X, Y, Z)`` voxel ``flow`` on ``grid`` as the same displacement on ``image``'s grid, a lossless
    reorientation of it: array axes permuted and flipped, components permuted and negated (exact)."""
    if orientation_code(image) == orientation_code(grid):
        return flow
    # signed permutation taking a step along grid axis a to a step in image index space
    axes = np.rint(np.reshape(image.GetDirection(), (3, 3)).T @ np.reshape(grid.direction, (3, 3)))
    code = orientation_code(image)
    components = [orient(image_from_array(np.ascontiguousarray(flow[a]), grid), code) for a in range(3)]
    stored = [sitk.GetArrayViewFromImage(c).transpose(2, 1, 0) for c in components]
    result = np.empty((3, *image.GetSize()), dtype=np.float32)
    for b in range(3):
        a = int(np.flatnonzero(axes[b])[0])
        np.multiply(stored[a], np.float32(axes[b, a]), out=result[b])
    return result


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


def is_reoriented_grid(grid: ModelGrid, image: sitk.Image) -> bool:
    """True when ``image``'s grid is ``grid`` up to a lossless reorientation (axes permuted and flipped)."""
    return _reoriented(grid.reference_image(sitk.sitkUInt8), image) is not None


def folding_fraction_of_flow(flow: np.ndarray, grid: ModelGrid) -> float:
    """:func:`folding_fraction` of the field :func:`displacement_field` makes from ``flow`` without pre-alignment
    on a fixed grid that is ``grid`` (up to a reorientation, which leaves every determinant unchanged),
    computed on the flow itself (:func:`iirp.kernels.jacobian.folding_count`): no float64 field in mm."""
    from iirp.kernels.jacobian import folding_count

    return folding_count(flow, grid.spacing) / float(np.prod(flow.shape[1:]))
