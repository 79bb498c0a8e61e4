"""Cohort runs: many pairs, one solver, one output folder per pair, a summary that survives failures.

A pair that fails (missing or bad image, any error while registering it) is
recorded in the summary with its one-line reason and skipped; the others go
on. ``summary.csv`` is rewritten (atomically) after every pair, so an
interrupted run still leaves an accurate record of what finished.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from iirp.atomic import os_error_text, write_text
from iirp.errors import IirpError, OutputError, one_line
from iirp.runtime.imageio import check_output_dir
from iirp.runtime.pairs import RESERVED_IDS, ImagePair, PairsFileError, check_pair_id
from iirp.runtime.register import RegistrationOptions, register_files
from iirp.runtime.solvers import FlowSolver
from iirp.typing import PathLike

__all__ = ["PairOutcome", "CohortSummary", "register_cohort", "cohort_entry", "SUMMARY_COLUMNS"]

SUMMARY_COLUMNS = (
    "id", "status", "error", "fixed", "moving", "iterations", "estimator_passes", "folding_fraction", "seconds",
    "output",
)


@dataclass
class PairOutcome:
    """What happened to one pair.

    Attributes:
        pair: the pair.
        ok: registered and written.
        error: the one-line reason when not ``ok``.
        report: the registration report when ``ok``.
        seconds: wall time spent on the pair.
        output: the pair's output folder.
    """

    pair: ImagePair
    ok: bool
    error: str = ""
    report: Optional[dict] = None
    seconds: float = 0.0
    output: str = ""

    def row(self) -> dict[str, str]:
        rep = self.report or {}
        return {
            "id": self.pair.id,
            "status": "ok" if self.ok else "failed",
            "error": self.error,
            "fixed": str(self.pair.fixed),
            "moving": str(self.pair.moving),
            "iterations": " ".join(str(n) for n in rep.get("iterations", [])),
            "estimator_passes": str(rep.get("estimator_passes", "")),
            "folding_fraction": f"{rep['folding_fraction']:.6f}" if "folding_fraction" in rep else "",
            "seconds": f"{self.seconds:.2f}",
            "output": self.output if self.ok else "",
        }


@dataclass
class CohortSummary:
    """All outcomes, in the order of the pairs file, and where the summary was written."""

    outcomes: list[PairOutcome] = field(default_factory=list)
    summary_csv: Optional[Path] = None

    @property
    def failed(self) -> list[PairOutcome]:
        return [o for o in self.outcomes if not o.ok]


def _write_summary(path: Path, outcomes: list[PairOutcome]) -> None:
    """``summary.csv`` with one row per outcome, replaced atomically."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    for outcome in outcomes:
        writer.writerow(outcome.row())
    write_text(path, text.getvalue())


def cohort_entry(entry: Path) -> bool:
    """True for what an earlier cohort run leaves in its folder: summary CSVs and pair folders."""
    return (entry.is_file() and RESERVED_IDS.match(entry.name) is not None) or (
        entry.is_dir() and not entry.is_symlink() and not entry.name.startswith(".")
    )


def _pair_folder(root: Path, pair: ImagePair) -> Path:
    """``root/<id>``, checked to be a direct child of ``root`` (ids are checked by :mod:`.pairs` already)."""
    target = root / check_pair_id(pair.id, f"pair {pair.id!r}")
    if target.parent != root or target.name != pair.id:
        raise PairsFileError(f"pair id {pair.id!r} does not name a folder inside {root}")
    return target


def register_cohort(
    pairs: list[ImagePair],
    solver: FlowSolver,
    out_dir: PathLike,
    *,
    options: RegistrationOptions = RegistrationOptions(),
    qc: bool = False,
    overwrite: bool = False,
    on_pair: Optional[Callable[[int, PairOutcome], None]] = None,
) -> CohortSummary:
    """Register every pair with ``solver`` into ``out_dir/<pair id>/`` and write ``out_dir/summary.csv``.

    Each pair's folder holds what :func:`register_files` writes (all or nothing). The
    moving labels (``moving_seg``) are warped when the pair names them.

    Args:
        overwrite: accept an ``out_dir`` that holds an earlier cohort (summary CSVs and pair folders) and
            replace each pair's earlier outputs; without it ``out_dir`` must be empty or new.
        on_pair: called after each pair with its 0-based index and outcome (progress display).

    Raises:
        OutputError: ``out_dir`` cannot be created or written, or is not empty without ``overwrite``
            (before any pair runs).
    """
    root = check_output_dir(out_dir, overwrite=overwrite, owned=cohort_entry, role="cohort output folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cohort output folder {root} cannot be created: {os_error_text(err)}") from err
    summary = CohortSummary(summary_csv=root / "summary.csv")
    for index, pair in enumerate(pairs):
        t0 = time.perf_counter()
        try:
            target = _pair_folder(root, pair)
            report = register_files(
                pair.fixed, pair.moving, solver, target, moving_seg=pair.moving_seg, options=options, qc=qc,
                overwrite=overwrite,
            )
            outcome = PairOutcome(pair, True, report=report, output=str(target))
        except IirpError as err:
            outcome = PairOutcome(pair, False, error=one_line(str(err)))
        except MemoryError:
            outcome = PairOutcome(pair, False, error="out of memory while registering this pair")
        except Exception as err:  # noqa: BLE001 - one broken pair must not stop the cohort
            outcome = PairOutcome(pair, False, error=one_line(f"unexpected {type(err).__name__}: {err}"))
        outcome.seconds = time.perf_counter() - t0
        summary.outcomes.append(outcome)
        assert summary.summary_csv is not None
        _write_summary(summary.summary_csv, summary.outcomes)
        if on_pair is not None:
            on_pair(index, outcome)
    return summary
