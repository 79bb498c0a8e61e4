"""Prepare the inputs of the GPU checks (``benchmarks/device_check.sh``) on a machine with SimpleITK and the data.

The GPU machine has neither SimpleITK nor ``../shared/data``, so this script puts
the LPBA40 pair S05 (fixed) / S20 (moving) on the 160x192x160 model grid with the
project's own geometry (:func:`iirp.runtime.register.prepare_pair`, default
options: min-max intensity, no pre-alignment), brings their label maps onto the
same grid (nearest neighbour; voxel for voxel when the grids already agree),
and writes into ``OUT`` (default ``benchmarks/device_inputs``, git-ignored):

* ``lpba40_pair.npz`` (compressed): ``fixed``, ``moving`` ``(X, Y, Z)`` float32 in [0, 1];
  ``fixed_seg``, ``moving_seg`` ``(X, Y, Z)`` uint8 when every label fits, else int16.
  Arrays are in the model's (i, j, k) order (:mod:`iirp.runtime.geometry`).
* ``mind.pt``: the released checkpoint, copied.
* ``meta.json``: shapes, dtypes, sources, sha256 of the checkpoint, total size.

    python benchmarks/prepare_device_inputs.py [--data ../shared/data] [--out benchmarks/device_inputs]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from iirp.model.checkpoint import sha256_file
from iirp.runtime.geometry import ModelGrid, array_from_image, orient, same_grid
from iirp.runtime.imageio import read_image, read_labels
from iirp.runtime.register import RegistrationOptions, prepare_pair

MODEL_SIZE = (160, 192, 160)
#: What the device tool carries at most (all carried paths together).
CARRY_LIMIT = 64 * 2**20


def labels_on_grid(labels: sitk.Image, grid: ModelGrid) -> np.ndarray:
    """A label map on ``grid`` as an ``(X, Y, Z)`` array of its own integer type (nearest neighbour, 0 outside)."""
    oriented = orient(labels)
    if not same_grid(oriented, grid):
        identity = sitk.Transform(3, sitk.sitkIdentity)
        oriented = sitk.Resample(labels, grid.reference_image(labels.GetPixelID()), identity,
                                 sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    return array_from_image(oriented, dtype=None)


def compact_labels(array: np.ndarray) -> np.ndarray:
    """uint8 when every label is in [0, 255], else int16 (checked, never wrapped)."""
    low, high = int(array.min()), int(array.max())
    if 0 <= low and high <= 255:
        return array.astype(np.uint8)
    if -(2**15) <= low and high < 2**15:
        return array.astype(np.int16)
    raise ValueError(f"labels in [{low}, {high}] fit neither uint8 nor int16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "device_inputs")
    args = parser.parse_args()

    brain = args.data / "brain"
    ckpt = args.data / "mindboggle" / "mind.pt"
    fixed = read_image(brain / "LPBA40_S05_vol.nii.gz", "fixed")
    moving = read_image(brain / "LPBA40_S20_vol.nii.gz", "moving")
    pair = prepare_pair(fixed, moving, MODEL_SIZE, RegistrationOptions())
    segs = {}
    for role, name in (("fixed_seg", "LPBA40_S05_seg"), ("moving_seg", "LPBA40_S20_seg")):
        raw = labels_on_grid(read_labels(brain / f"{name}.nii.gz", role), pair.grid)
        segs[role] = compact_labels(raw)
        assert np.array_equal(segs[role].astype(raw.dtype), raw)

    args.out.mkdir(parents=True, exist_ok=True)
    npz = args.out / "lpba40_pair.npz"
    np.savez_compressed(npz, fixed=pair.fixed.astype(np.float32), moving=pair.moving.astype(np.float32), **segs)
    shutil.copyfile(ckpt, args.out / "mind.pt")
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    meta = {
        "pair": "LPBA40 S05 (fixed) <- S20 (moving)",
        "model_size": list(MODEL_SIZE),
        "voxel_for_voxel": pair.voxel_for_voxel,
        "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                   for k, v in {"fixed": pair.fixed, "moving": pair.moving, **segs}.items()},
        "labels": {k: int(np.count_nonzero(np.unique(v))) for k, v in segs.items()},
        "checkpoint": {"source": str(ckpt), "sha256": sha256_file(ckpt)},
        "bytes": total,
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta, indent=2))
    if total > CARRY_LIMIT:
        raise SystemExit(f"{args.out} holds {total} bytes, more than the device tool carries ({CARRY_LIMIT})")
    print(f"{args.out}: {total / 2**20:.1f} MiB (carry limit {CARRY_LIMIT / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
