"""Rebuild the demo data in ``iirp/demo/data`` from the nilearn wheel (reproducible; no nilearn import).

Usage::

    pip download nilearn==0.14.1 --no-deps -d /tmp/nl
    python -m iirp.demo._make /tmp/nl/nilearn-0.14.1-py3-none-any.whl

Reads the ICBM 2009a nonlinear symmetric T1 template and its GM / WM probability maps
(``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``, 1 mm,
197 x 233 x 189, uint8) straight from the wheel (zipfile) and writes:

* ``icbm152_t1.nii.gz``: the T1 template, Gaussian-smoothed (sigma 1 mm, anti-aliasing),
  linearly resampled to :data:`SHAPE` voxels of :data:`SPACING` mm, RAS, centred on the
  centre of the brain's bounding box (rounded to whole millimetres), uint8;
* ``icbm152_tissue.nii.gz``: labels 0 background, 1 GM, 2 WM: the tissue with the larger
  (linearly resampled) probability where GM + WM >= 0.5, else 0; uint8;
* the copyright notice stays in ``LICENSE-ICBM152.txt`` (written by hand, see there).
"""

from __future__ import annotations

import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from iirp.runtime.geometry import ModelGrid, array_from_image, image_from_array, orientation_direction

#: Demo model grid ``(X, Y, Z)`` voxels and spacing (mm): 160 x 200 x 160 mm, RAS.
SHAPE = (64, 80, 64)
SPACING = 2.5
_MEMBER = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
OUT = Path(__file__).resolve().parent / "data"


def _read(wheel: zipfile.ZipFile, tissue: str, tmp: Path) -> sitk.Image:
    path = tmp / f"{tissue}.nii.gz"
    path.write_bytes(wheel.read(_MEMBER.format(tissue)))
    return sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)


def demo_grid(t1: sitk.Image) -> ModelGrid:
    """RAS grid of SHAPE x SPACING centred on the brain's bounding box (whole mm)."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(t1 > 0, sitk.sitkUInt8))
    box = stats.GetBoundingBox(1)  # (x0, y0, z0, sx, sy, sz) in index units
    centre_index = [box[i] + (box[i + 3] - 1) / 2.0 for i in range(3)]
    centre = np.round(np.asarray(t1.TransformContinuousIndexToPhysicalPoint(centre_index)))
    direction = orientation_direction("RAS")
    half = (np.asarray(direction).reshape(3, 3) * SPACING) @ ((np.asarray(SHAPE) - 1) / 2.0)
    origin = centre - half
    return ModelGrid(SHAPE, (SPACING,) * 3, tuple(float(o) for o in origin), direction)  # type: ignore[arg-type]


def _resample(image: sitk.Image, grid: ModelGrid) -> np.ndarray:
    smoothed = sitk.SmoothingRecursiveGaussian(image, 1.0)
    out = sitk.Resample(smoothed, grid.reference_image(), sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear, 0.0)
    return array_from_image(out)


def make(wheel_path: str, out: Path = OUT) -> None:
    with zipfile.ZipFile(wheel_path) as wheel, tempfile.TemporaryDirectory() as tmp:
        t1, gm, wm = (_read(wheel, t, Path(tmp)) for t in ("t1", "gm", "wm"))
    grid = demo_grid(t1)
    t1_arr = np.clip(np.round(_resample(t1, grid)), 0, 255).astype(np.uint8)
    gm_arr, wm_arr = _resample(gm, grid) / 255.0, _resample(wm, grid) / 255.0
    labels = np.where(gm_arr + wm_arr >= 0.5, np.where(wm_arr > gm_arr, 2, 1), 0).astype(np.uint8)
    out.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image_from_array(t1_arr, grid), str(out / "icbm152_t1.nii.gz"), useCompression=True)
    sitk.WriteImage(image_from_array(labels, grid), str(out / "icbm152_tissue.nii.gz"), useCompression=True)
    print(f"grid origin {grid.origin}, labels {np.bincount(labels.ravel())}")


if __name__ == "__main__":
    make(sys.argv[1])
