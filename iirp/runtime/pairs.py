"""Lists of image pairs from a CSV file (cohort runs, accuracy benchmarks).

Columns (header row required, any order, extra columns ignored):

* ``fixed``, ``moving``: image paths (required);
* ``fixed_seg``, ``moving_seg``: label maps (optional; an empty cell means none);
* ``labels``: the labels to score, separated by spaces or ``;`` (optional; default:
  the non-zero labels both label maps share);
* ``id``: a name for the pair's output folder (optional; default ``NNN_<moving>_to_<fixed>``).
  Characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``; an id that is
  empty, starts with a dot (``.``, ``..``, hidden names), is longer than
  :data:`MAX_ID_LENGTH`, or names a file the cohort itself writes (``summary.csv``,
  ``summary.<i>-of-<n>.csv``) is refused, so every pair's folder stays a plain folder inside
  the cohort's output folder. Ids must be unique, also ignoring case.

Relative paths are relative to the CSV file's folder. Files are not opened
here: a missing image is the pair's own failure, reported when it is run.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from iirp.errors import IirpError
from iirp.typing import PathLike

__all__ = ["PairsFileError", "ImagePair", "RESERVED_IDS", "MAX_ID_LENGTH", "check_pair_id", "read_pairs"]

_REQUIRED = ("fixed", "moving")
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")
#: Names the cohort writes into its output folder; no pair id may take them (compared ignoring case).
RESERVED_IDS = re.compile(r"^summary(\.\d+-of-\d+)?\.csv$", re.IGNORECASE)
#: Longest pair id (a folder name must fit in 255 bytes).
MAX_ID_LENGTH = 128


class PairsFileError(IirpError):
    """A pairs CSV file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class ImagePair:
    """One row of a pairs file, paths resolved.

    Attributes:
        id: folder-safe unique name.
        fixed, moving: image paths.
        fixed_seg, moving_seg: label map paths, or None.
        labels: labels to score, or None for the default.
        row: 1-based data row number in the CSV (for messages).
    """

    id: str
    fixed: Path
    moving: Path
    fixed_seg: Optional[Path] = None
    moving_seg: Optional[Path] = None
    labels: Optional[tuple[int, ...]] = None
    row: int = 0


def _stem(path: str) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".gz"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _labels(cell: str, where: str) -> Optional[tuple[int, ...]]:
    cell = cell.strip()
    if not cell:
        return None
    try:
        values = tuple(int(v) for v in re.split(r"[;\s]+", cell) if v)
    except ValueError as err:
        raise PairsFileError(f"{where}: 'labels' must be integers separated by spaces or ';', got {cell!r}") from err
    return values or None


def check_pair_id(pair_id: str, where: str) -> str:
    """``pair_id`` after checking it names a plain folder inside the cohort folder (see the module docstring).

    Raises:
        PairsFileError: empty, starting with a dot, too long, or a reserved name.
    """
    if not pair_id or pair_id.startswith("."):
        raise PairsFileError(f"{where}: id {pair_id!r} must not be empty or start with '.' (ids name folders)")
    if len(pair_id) > MAX_ID_LENGTH:
        raise PairsFileError(f"{where}: id {pair_id[:20]!r}... is longer than {MAX_ID_LENGTH} characters")
    if RESERVED_IDS.match(pair_id):
        raise PairsFileError(f"{where}: id {pair_id!r} is reserved (the cohort writes a file of that name)")
    return pair_id


def read_pairs(path: PathLike, need_segs: bool = False) -> list[ImagePair]:
    """Read a pairs CSV (see the module docstring).

    Args:
        need_segs: every row must name ``fixed_seg`` and ``moving_seg`` (accuracy runs).

    Raises:
        PairsFileError: missing or unreadable file, no header, a required column or cell
            missing, bad labels, duplicate ids, no rows.
    """
    csv_path = Path(os.fspath(path))
    if not csv_path.is_file():
        raise PairsFileError(f"pairs file {csv_path} not found")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise PairsFileError(f"cannot read pairs file {csv_path}: {err}") from err
    required = _REQUIRED + (("fixed_seg", "moving_seg") if need_segs else ())
    missing = [c for c in required if c not in header]
    if missing:
        raise PairsFileError(
            f"pairs file {csv_path} has no column {', '.join(repr(m) for m in missing)} (header: {', '.join(header)})"
        )
    base = csv_path.parent
    pairs: list[ImagePair] = []
    seen: set[str] = set()
    for number, raw in enumerate(rows, start=1):
        # cells beyond the header (key None, a list) are ignored; missing cells are None
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None and not isinstance(v, list)}
        where = f"pairs file {csv_path}, row {number}"
        if not any(row.values()):
            continue  # blank line
        for column in required:
            if not row.get(column):
                raise PairsFileError(f"{where}: empty '{column}'")
        for column in ("fixed", "moving", "fixed_seg", "moving_seg"):
            if "\x00" in row.get(column, ""):
                raise PairsFileError(f"{where}: '{column}' holds a NUL character")
        segs = {c: (base / row[c]) if row.get(c) else None for c in ("fixed_seg", "moving_seg")}
        default_id = f"{number:03d}_{_stem(row['moving'])}_to_{_stem(row['fixed'])}"
        pair_id = check_pair_id(_SAFE_ID.sub("_", row.get("id", "") or default_id), where)
        if pair_id.lower() in seen:
            raise PairsFileError(f"{where}: duplicate id {pair_id!r} (ids must differ also ignoring case)")
        seen.add(pair_id.lower())
        pairs.append(ImagePair(
            id=pair_id, fixed=base / row["fixed"], moving=base / row["moving"],
            fixed_seg=segs["fixed_seg"], moving_seg=segs["moving_seg"],
            labels=_labels(row.get("labels", ""), where), row=number,
        ))
    if not pairs:
        raise PairsFileError(f"pairs file {csv_path} lists no pair")
    return pairs
