"""Intensity normalisation to the network's [0, 1] range.

Rules (the ``--intensity`` option):

* ``minmax`` (default): ``(v - min) / (max - min)``.
* ``percentile:LO,HI``: clip to the LO-th and HI-th percentiles of all voxels,
  then scale to [0, 1]; for raw MR whose bright outliers would squash minmax.
* ``window:LO,HI``: clip to [LO, HI] (e.g. Hounsfield units), then scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from iirp.errors import ImageError, IntensitySpecError

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = ["IntensityRule", "parse_intensity", "normalize"]


@dataclass(frozen=True)
class IntensityRule:
    """A parsed intensity rule; ``low``/``high`` are percentiles or values depending on ``kind``."""

    kind: str
    low: float = 0.0
    high: float = 0.0

    @property
    def spec(self) -> str:
        return self.kind if self.kind == "minmax" else f"{self.kind}:{self.low:g},{self.high:g}"


def parse_intensity(spec: str) -> IntensityRule:
    """Parse ``minmax | percentile:LO,HI | window:LO,HI``.

    Raises:
        IntensitySpecError: malformed spec, LO >= HI, or percentiles outside [0, 100].
    """
    text = spec.strip().lower()
    if text == "minmax":
        return IntensityRule("minmax")
    kind, _, args = text.partition(":")
    if kind in ("percentile", "window"):
        try:
            low, high = (float(v) for v in args.split(","))
        except ValueError:
            low = high = float("nan")
        ok = np.isfinite([low, high]).all() and low < high
        if kind == "percentile":
            ok = ok and 0.0 <= low and high <= 100.0
        if ok:
            return IntensityRule(kind, low, high)
    raise IntensitySpecError(
        f"intensity spec {spec!r} not understood: expected 'minmax', 'percentile:LO,HI' "
        "(0 <= LO < HI <= 100) or 'window:LO,HI' (LO < HI)"
    )


def normalize(image: "sitk.Image", rule: IntensityRule, role: str = "input image") -> "sitk.Image":
    """Map intensities to [0, 1] by ``rule``; returns a float32 image on the same grid.

    Args:
        role: how error messages name the image, e.g. ``"fixed image /data/a.nii.gz"``.

    Raises:
        ImageError: the rule leaves the image constant (e.g. a window outside its range).
    """
    import SimpleITK as sitk

    values = sitk.GetArrayViewFromImage(image).astype(np.float64)
    if rule.kind == "minmax":
        low, high = float(values.min()), float(values.max())
    elif rule.kind == "percentile":
        low, high = (float(v) for v in np.percentile(values, [rule.low, rule.high]))
    else:
        low, high = rule.low, rule.high
    if not high > low:
        raise ImageError(f"{role} is constant under intensity rule {rule.spec!r} ({low:g}..{high:g})")
    scaled = (np.clip(values, low, high) - low) / (high - low)
    if scaled.max() == scaled.min():
        raise ImageError(
            f"{role} is constant under intensity rule {rule.spec!r}: all its values lie outside "
            f"{low:g}..{high:g}"
        )
    out = sitk.GetImageFromArray(scaled.astype(np.float32))
    out.CopyInformation(image)
    return out
