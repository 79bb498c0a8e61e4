"""Registration quality measures: label overlap, surface distance, field regularity, image similarity.

Label maps are compared on one grid (the fixed image's): the fixed labels
against the moving labels warped onto it. Where SimpleITK has the measure, it
is used (label overlap, signed Maurer distance, Jacobian determinant);
:func:`mean_dice_arrays` is a numpy twin of :func:`label_dice` for machines
without SimpleITK (the GPU image) and is tested against it.

Conventions:

* Dice is per label in [0, 1]; a label absent from both maps is not scored.
* HD95 is in millimetres (the image spacing): for each label, the larger of
  the two directed 95th percentiles of surface-to-surface distances (surface
  voxels: SimpleITK ``LabelContour``, full connectivity), as in
  MONAI/``surface-distance``'s robust Hausdorff. A label missing from either
  map has no HD95 (NaN) and is counted in ``missing``.
* Folding fraction is the share of voxels with Jacobian determinant <= 0;
  SDlogJ is the standard deviation of ``log(clip(det J, 1e-9, 1e9))`` over
  the whole grid.
* Image similarity (MSE, NCC) is between the fixed image and the warped
  moving image after the same intensity rule as registration, over the
  whole grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterable, Optional

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = [
    "PairMetrics",
    "shared_labels",
    "dice_arrays",
    "mean_dice_arrays",
    "label_dice",
    "hd95",
    "jacobian_stats",
    "image_similarity",
    "pair_metrics",
]

_LOG_JAC_CLIP = (1e-9, 1e9)


@dataclass(frozen=True)
class PairMetrics:
    """The measures of one registration result (see the module docstring for definitions).

    Attributes:
        dice: mean Dice over the labels.
        dice_per_label: label -> Dice.
        hd95_mm: mean HD95 over the labels present in both maps (NaN when none).
        hd95_missing: labels without an HD95 (absent from one map).
        folding_fraction: share of voxels with det J <= 0.
        sdlogj: standard deviation of log det J.
        mse: mean squared intensity difference (normalised intensities).
        ncc: global normalised cross-correlation of the two images.
    """

    dice: float
    dice_per_label: dict[int, float]
    hd95_mm: float
    hd95_missing: int
    folding_fraction: float
    sdlogj: float
    mse: float
    ncc: float

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["dice_per_label"] = {str(k): v for k, v in self.dice_per_label.items()}
        return out


def shared_labels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-zero label values present in both arrays (sorted int64)."""
    both = np.intersect1d(np.unique(a), np.unique(b))
    return both[both != 0].astype(np.int64)


def dice_arrays(
    reference: np.ndarray, candidate: np.ndarray, labels: Optional[Iterable[int]] = None
) -> dict[int, float]:
    """Dice per label, ``2|A & B| / (|A| + |B|)``, of two integer label arrays of one shape (numpy only).

    The numpy twin of :func:`label_dice` (for machines without SimpleITK), tested against it.

    Args:
        reference, candidate: label arrays of one shape, any integer or float dtype (compared by value).
        labels: the labels to score; default the non-zero labels of ``reference``. A label absent from
            both arrays is left out.

    Raises:
        ValueError: the shapes differ.
    """
    if reference.shape != candidate.shape:
        raise ValueError(f"dice_arrays(): shapes differ, {reference.shape} and {candidate.shape}")
    chosen = [int(v) for v in np.unique(reference) if v != 0] if labels is None else [int(v) for v in labels]
    scores = {}
    for label in chosen:
        a, b = reference == label, candidate == label
        total = int(a.sum()) + int(b.sum())
        if total:
            scores[label] = 2.0 * int(np.logical_and(a, b).sum()) / total
    return scores


def mean_dice_arrays(reference: np.ndarray, candidate: np.ndarray, labels: Iterable[int]) -> float:
    """Mean of :func:`dice_arrays` over ``labels``.

    Raises:
        ValueError: the shapes differ or no label of ``labels`` is present in either map.
    """
    if reference.shape != candidate.shape:
        raise ValueError(f"mean_dice_arrays(): shapes differ, {reference.shape} and {candidate.shape}")
    scores = dice_arrays(reference, candidate, labels)
    if not scores:
        raise ValueError("mean_dice_arrays(): no label of 'labels' is present in either map")
    return float(np.mean(list(scores.values())))


def _int_labels(image: "sitk.Image", reference: Optional["sitk.Image"] = None) -> "sitk.Image":
    import SimpleITK as sitk

    out = sitk.Cast(image, sitk.sitkInt32)
    if reference is not None:
        out.CopyInformation(reference)
    return out


def label_dice(reference: "sitk.Image", candidate: "sitk.Image", labels: Iterable[int]) -> dict[int, float]:
    """Dice per label with SimpleITK's ``LabelOverlapMeasuresImageFilter`` (both on one grid).

    Labels absent from both maps are left out.
    """
    import SimpleITK as sitk

    ref = _int_labels(reference)
    cand = _int_labels(candidate, ref)
    present = set(np.unique(sitk.GetArrayViewFromImage(ref))) | set(np.unique(sitk.GetArrayViewFromImage(cand)))
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(ref, cand)
    return {int(lb): float(overlap.GetDiceCoefficient(int(lb))) for lb in labels if int(lb) in present}


def _directed_surface_distances(source_surface: np.ndarray, target: "sitk.Image") -> np.ndarray:
    """Distances (mm) from each voxel of ``source_surface`` (bool, numpy z,y,x) to the boundary of ``target``."""
    import SimpleITK as sitk

    distance = sitk.Abs(
        sitk.SignedMaurerDistanceMap(target, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    )
    return sitk.GetArrayViewFromImage(distance)[source_surface]


def hd95(
    reference: "sitk.Image", candidate: "sitk.Image", labels: Iterable[int], percentile: float = 95.0
) -> dict[int, float]:
    """Robust Hausdorff distance per label in mm (see the module docstring); NaN where a label is missing.

    Each label is cropped to the bounding box of both masks plus a margin, so the distance
    maps stay small.
    """
    import SimpleITK as sitk

    ref = sitk.GetArrayFromImage(_int_labels(reference))
    cand = sitk.GetArrayFromImage(_int_labels(candidate))
    spacing = reference.GetSpacing()
    out: dict[int, float] = {}
    for label in labels:
        a, b = ref == label, cand == label
        if not a.any() or not b.any():
            out[int(label)] = float("nan")
            continue
        zyx = np.argwhere(a | b)
        lo = np.maximum(zyx.min(axis=0) - 2, 0)
        hi = np.minimum(zyx.max(axis=0) + 3, a.shape)
        window = tuple(slice(int(s), int(e)) for s, e in zip(lo, hi))
        masks = []
        for m in (a[window], b[window]):
            img = sitk.GetImageFromArray(m.astype(np.uint8))
            img.SetSpacing(spacing)
            masks.append(img)
        surfaces = [sitk.GetArrayFromImage(sitk.LabelContour(m, fullyConnected=True)) > 0 for m in masks]
        d_ab = _directed_surface_distances(surfaces[0], masks[1])
        d_ba = _directed_surface_distances(surfaces[1], masks[0])
        out[int(label)] = float(max(np.percentile(d_ab, percentile), np.percentile(d_ba, percentile)))
    return out


def jacobian_stats(field: "sitk.Image") -> tuple[float, float]:
    """``(folding fraction, SDlogJ)`` of an ITK displacement field (mm, LPS)."""
    import SimpleITK as sitk

    from iirp.runtime.deformation import jacobian_determinant

    det = sitk.GetArrayFromImage(jacobian_determinant(field))
    folding = float((det <= 0).mean())
    sdlogj = float(np.log(np.clip(det, *_LOG_JAC_CLIP)).std())
    return folding, sdlogj


def image_similarity(fixed: np.ndarray, warped: np.ndarray) -> tuple[float, float]:
    """``(MSE, NCC)`` of two intensity arrays of one shape (float64 arithmetic)."""
    if fixed.shape != warped.shape:
        raise ValueError(f"image_similarity(): shapes differ, {fixed.shape} and {warped.shape}")
    a = fixed.astype(np.float64).ravel()
    b = warped.astype(np.float64).ravel()
    mse = float(np.mean((a - b) ** 2))
    a0, b0 = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a0 * a0).sum() * (b0 * b0).sum()))
    return mse, float((a0 * b0).sum() / denom) if denom > 0 else 0.0


def pair_metrics(
    fixed_seg: "sitk.Image",
    warped_seg: "sitk.Image",
    field: "sitk.Image",
    fixed_image: np.ndarray,
    warped_image: np.ndarray,
    labels: Optional[Iterable[int]] = None,
) -> PairMetrics:
    """All measures of one result, on the fixed image's grid.

    Args:
        fixed_seg, warped_seg: label maps on one grid.
        field: the ITK displacement field that produced ``warped_seg``.
        fixed_image, warped_image: normalised intensities, same shape.
        labels: the labels to score; default: the non-zero labels of ``fixed_seg`` (a label the
            warped map lacks scores Dice 0). Pass :func:`shared_labels` of the fixed and moving
            maps to score only what both subjects have.

    Raises:
        ValueError: no label to score.
    """
    import SimpleITK as sitk

    if labels is None:
        values = np.unique(sitk.GetArrayViewFromImage(fixed_seg))
        labels = values[values != 0]
    labels = [int(lb) for lb in labels]
    if not labels:
        raise ValueError("pair_metrics(): no label to score (the label maps share no non-zero label)")
    dice = label_dice(fixed_seg, warped_seg, labels)
    if not dice:
        raise ValueError(f"pair_metrics(): none of the labels {labels[:5]}... is in either label map")
    distances = hd95(fixed_seg, warped_seg, labels)
    finite = [d for d in distances.values() if np.isfinite(d)]
    folding, sdlogj = jacobian_stats(field)
    mse, ncc = image_similarity(fixed_image, warped_image)
    return PairMetrics(
        dice=float(np.mean(list(dice.values()))),
        dice_per_label=dice,
        hd95_mm=float(np.mean(finite)) if finite else float("nan"),
        hd95_missing=len(distances) - len(finite),
        folding_fraction=folding,
        sdlogj=sdlogj,
        mse=mse,
        ncc=ncc,
    )
