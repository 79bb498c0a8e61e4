"""Training data for ``iirp-train``: volumes on the model grid, kept in memory, and a seeded pair sampler.

Every volume goes through exactly what ``iirp-run`` does to a fixed image
(:func:`iirp.runtime.register.prepare_pair`): read as float32, intensity rule
(default ``minmax``), lossless reorientation to RAS, and the model grid
(the volume itself when it already has the model size and spacing, else
``shape`` voxels of ``spacing`` mm centred on its foreground, linear
resampling). This happens once per volume. Arrays are ``(X, Y, Z)`` float32 in
[0, 1], NIfTI (i, j, k) order (see :mod:`iirp.runtime.geometry`); no torch here.

All randomness of the data (pair choice, flips, intensity jitter, synthetic
deformations) comes from one ``numpy.random.Generator`` whose state
:meth:`PairSampler.state` / :meth:`PairSampler.set_state` save and restore, so a
resumed run draws the same pairs as an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from iirp.model.errors import TrainingDataError
from iirp.typing import PathLike

__all__ = [
    "IMAGE_SUFFIXES",
    "TrainPair",
    "ValPair",
    "list_volumes",
    "load_volume",
    "load_volumes",
    "load_val_pairs",
    "PairSampler",
]

#: File names ``iirp-train`` picks up from a DATA folder.
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")
_CSV_COLUMNS = ("path", "image", "volume", "file")


def _is_image(path: Path) -> bool:
    return path.is_file() and any(path.name.lower().endswith(s) for s in IMAGE_SUFFIXES)


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise TrainingDataError(f"cannot read CSV {path}: {err}") from err
    return rows


def _resolve(value: str, base: Path) -> Path:
    p = Path(value.strip()).expanduser()
    return p if p.is_absolute() else base / p


def list_volumes(data: PathLike) -> list[Path]:
    """The training volumes named by ``data``.

    Args:
        data: a folder (its image files, sorted by name, not recursive), a CSV file (a
            column ``path``, ``image``, ``volume`` or ``file``, or else the first column;
            relative paths are relative to the CSV's folder), or one image file.

    Raises:
        TrainingDataError: ``data`` is missing, the folder has no images, or the CSV is empty
            or has no usable column.
    """
    p = Path(os.fspath(data))
    if not p.exists():
        raise TrainingDataError(f"training data not found: {p}")
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if _is_image(f))
        if not found:
            raise TrainingDataError(
                f"training data folder {p} holds no volumes (looked for {', '.join(IMAGE_SUFFIXES)})"
            )
        return found
    if p.suffix.lower() == ".csv":
        rows = _read_csv(p)
        if not rows or not rows[0]:
            raise TrainingDataError(f"training CSV {p} lists no volumes (expected a header and one path a row)")
        column = next((c for c in rows[0] if c and c.strip().lower() in _CSV_COLUMNS), next(iter(rows[0])))
        paths = [_resolve(r[column], p.parent) for r in rows if (r.get(column) or "").strip()]
        if not paths:
            raise TrainingDataError(f"training CSV {p}: column {column!r} holds no paths")
        return paths
    if _is_image(p):
        return [p]
    raise TrainingDataError(
        f"training data {p} is neither a folder, a CSV file nor an image ({', '.join(IMAGE_SUFFIXES)})"
    )


def _options(shape: Sequence[int], spacing: float, intensity: str) -> Any:
    from iirp.runtime.register import RegistrationOptions

    return RegistrationOptions(intensity=intensity, spacing=(float(spacing),) * 3)


def load_volume(path: PathLike, shape: Sequence[int], spacing: float = 1.0, intensity: str = "minmax") -> np.ndarray:
    """One volume on its model grid, as ``iirp-run`` prepares a fixed image.

    Args:
        path: image file.
        shape: model grid ``(X, Y, Z)`` in voxels.
        spacing: model grid spacing in mm (isotropic).
        intensity: ``minmax | percentile:LO,HI | window:LO,HI``.

    Returns:
        ``(X, Y, Z)`` float32 in [0, 1].

    Raises:
        ImageError: missing, unreadable, not 3-D, NaN/Inf or constant image.
    """
    from iirp.runtime.imageio import read_image
    from iirp.runtime.register import prepare_pair

    image = read_image(path, "training")
    grid_size = tuple(int(s) for s in shape)
    pair = prepare_pair(image, image, grid_size, _options(shape, spacing, intensity),  # type: ignore[arg-type]
                        names=(f"training image {path}",) * 2)
    return np.ascontiguousarray(pair.fixed, dtype=np.float32)


def load_volumes(
    paths: Sequence[PathLike], shape: Sequence[int], spacing: float = 1.0, intensity: str = "minmax"
) -> list[np.ndarray]:
    """:func:`load_volume` for each path (see there)."""
    return [load_volume(p, shape, spacing, intensity) for p in paths]


@dataclass
class TrainPair:
    """One training pair, ``(X, Y, Z)`` float32 in [0, 1] each; ``flow`` is the true flow of a synthetic pair."""

    fixed: np.ndarray
    moving: np.ndarray
    flow: Optional[np.ndarray] = None


@dataclass
class ValPair:
    """A validation pair on the fixed image's model grid.

    Attributes:
        fixed, moving: ``(X, Y, Z)`` float32 in [0, 1].
        fixed_seg, moving_seg: ``(X, Y, Z)`` int64 labels (0 = background), nearest-neighbour resampled.
    """

    fixed: np.ndarray
    moving: np.ndarray
    fixed_seg: np.ndarray
    moving_seg: np.ndarray


def load_val_pairs(
    csv_path: PathLike, shape: Sequence[int], spacing: float = 1.0, intensity: str = "minmax"
) -> list[ValPair]:
    """Read a validation CSV (:func:`iirp.runtime.pairs.read_pairs`, columns ``fixed, moving, fixed_seg,
    moving_seg``) onto the model grid.

    Each pair is prepared as ``iirp-run`` prepares it (no pre-alignment); the label maps are
    resampled onto the fixed image's model grid by nearest neighbour.

    Raises:
        PairsFileError: CSV missing, empty or without those columns.
        ImageError: an image or label map is unreadable.
    """
    import SimpleITK as sitk

    from iirp.runtime.geometry import array_from_image
    from iirp.runtime.imageio import read_image, read_labels
    from iirp.runtime.pairs import read_pairs
    from iirp.runtime.register import prepare_pair

    options = _options(shape, spacing, intensity)
    pairs = []
    for row in read_pairs(csv_path, need_segs=True):
        fixed = read_image(row.fixed, "validation fixed")
        moving = read_image(row.moving, "validation moving")
        prepared = prepare_pair(fixed, moving, tuple(int(s) for s in shape), options,  # type: ignore[arg-type]
                                names=(f"validation image {row.fixed}", f"validation image {row.moving}"))
        reference = prepared.grid.reference_image(sitk.sitkInt64)
        identity = sitk.Transform(3, sitk.sitkIdentity)
        segs = []
        for column, seg_path in (("fixed_seg", row.fixed_seg), ("moving_seg", row.moving_seg)):
            if seg_path is None:  # read_pairs(need_segs=True) refuses such a row
                raise TrainingDataError(f"{csv_path} row {row.row}: no {column}")
            seg = sitk.Cast(read_labels(seg_path, f"validation {column}"), sitk.sitkInt64)
            on_grid = sitk.Resample(seg, reference, identity, sitk.sitkNearestNeighbor, 0, sitk.sitkInt64)
            segs.append(array_from_image(on_grid, dtype=np.int64))
        pairs.append(ValPair(prepared.fixed, prepared.moving, segs[0], segs[1]))
    return pairs


class PairSampler:
    """Seeded random pairs from in-memory volumes.

    Real pairs: two different volumes, uniformly. Synthetic pairs (``synthetic=True``):
    one volume and a random smooth deformation (:func:`iirp.synthetic.make_pair`), which
    also gives the true flow. Then optional flips (the same axes for both images; a
    synthetic pair's flow is flipped consistently) and intensity jitter (an independent
    gamma ``exp(U(-jitter, jitter))`` per image).

    Args:
        volumes: ``(X, Y, Z)`` float32 arrays in [0, 1], all of one shape.
        seed: seed of the generator.
        synthetic: make pairs by deformation instead of pairing volumes.
        flip: flip each axis with probability 1/2.
        jitter: gamma jitter strength (0 = none).
        max_displacement: synthetic flow bound in voxels.
        crop: optional ``(x, y, z)`` window: each pair is cut to a random window of this size
            (the same for both images and the flow), which makes steps cheaper.

    Raises:
        TrainingDataError: no volumes, shapes differ, or a single volume without ``synthetic``.
    """

    def __init__(
        self,
        volumes: Sequence[np.ndarray],
        seed: int = 0,
        *,
        synthetic: bool = False,
        flip: bool = False,
        jitter: float = 0.0,
        max_displacement: float = 4.0,
        crop: Optional[Sequence[int]] = None,
    ) -> None:
        if not volumes:
            raise TrainingDataError("no training volumes")
        if len({v.shape for v in volumes}) != 1:
            raise TrainingDataError(f"training volumes differ in shape: {sorted({v.shape for v in volumes})}")
        if len(volumes) < 2 and not synthetic:
            raise TrainingDataError("training needs at least 2 volumes (or --synthetic to deform one)")
        if jitter < 0:
            raise TrainingDataError(f"--jitter must be >= 0, got {jitter}")
        self.volumes = list(volumes)
        self.synthetic = synthetic
        self.flip = flip
        self.jitter = float(jitter)
        self.max_displacement = float(max_displacement)
        self.crop = tuple(int(c) for c in crop) if crop is not None else None
        if self.crop is not None and (len(self.crop) != 3 or any(
                c < 2 or c > n for c, n in zip(self.crop, volumes[0].shape))):
            raise TrainingDataError(f"--crop {self.crop} must be 3 extents within the model grid {volumes[0].shape}")
        self.rng = np.random.default_rng(seed)

    def state(self) -> str:
        """The generator state as a JSON string (restored by :meth:`set_state`)."""
        return json.dumps(self.rng.bit_generator.state)

    def set_state(self, state: str) -> None:
        self.rng.bit_generator.state = json.loads(state)

    def _gamma(self, image: np.ndarray) -> np.ndarray:
        if self.jitter <= 0:
            return image
        g = float(np.exp(self.rng.uniform(-self.jitter, self.jitter)))
        return np.power(np.clip(image, 0.0, 1.0), g, dtype=np.float32)

    def next(self) -> TrainPair:
        """Draw the next pair (advances the generator)."""
        from iirp.synthetic import make_pair

        if self.synthetic:
            index = int(self.rng.integers(len(self.volumes)))
            made = make_pair(self.volumes[index], self.rng, max_displacement=self.max_displacement)
            pair = TrainPair(made.fixed, made.moving, made.flow)
        else:
            i, j = self.rng.choice(len(self.volumes), size=2, replace=False)
            pair = TrainPair(self.volumes[int(i)], self.volumes[int(j)])
        if self.flip:
            axes = [a for a in range(3) if self.rng.random() < 0.5]
            if axes:
                flow = None
                if pair.flow is not None:
                    flow = np.flip(pair.flow, axis=tuple(a + 1 for a in axes)).copy()
                    flow[axes] *= -1.0  # a flipped axis reverses its displacement component
                flipped = tuple(axes)
                pair = TrainPair(np.flip(pair.fixed, flipped).copy(), np.flip(pair.moving, flipped).copy(), flow)
        if self.crop is not None:
            starts = [int(self.rng.integers(n - c + 1)) for n, c in zip(pair.fixed.shape, self.crop)]
            window = tuple(slice(s, s + c) for s, c in zip(starts, self.crop))
            flow = pair.flow[(slice(None),) + window].copy() if pair.flow is not None else None
            pair = TrainPair(pair.fixed[window].copy(), pair.moving[window].copy(), flow)
        return TrainPair(self._gamma(pair.fixed), self._gamma(pair.moving), pair.flow)
