"""Cohort runs: many pairs, one solver, one output folder per pair, a summary that survives failures.

A pair that fails (missing or bad image, any error while registering it) is
recorded in the summary with its one-line reason and skipped; the others go
on. ``summary.csv`` is rewritten (atomically) after every pair, so an
interrupted run still leaves an accurate record of what finished.
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from iirp.errors import IirpError
from iirp.runtime.imageio import check_output_dir
from iirp.runtime.pairs import ImagePair
from iirp.runtime.register import RegistrationOptions, register_files
from iirp.runtime.solvers import FlowSolver
from iirp.typing import PathLike

__all__ = ["PairOutcome", "CohortSummary", "register_cohort", "SUMMARY_COLUMNS"]

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
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for outcome in outcomes:
            writer.writerow(outcome.row())
    os.replace(tmp, path)


def register_cohort(
    pairs: list[ImagePair],
    solver: FlowSolver,
    out_dir: PathLike,
    *,
    options: RegistrationOptions = RegistrationOptions(),
    qc: bool = False,
    on_pair: Optional[Callable[[int, PairOutcome], None]] = None,
) -> CohortSummary:
    """Register every pair with ``solver`` into ``out_dir/<pair id>/`` and write ``out_dir/summary.csv``.

    Each pair's folder holds what :func:`register_files` writes (all or nothing). The
    moving labels (``moving_seg``) are warped when the pair names them.

    Args:
        on_pair: called after each pair with its 0-based index and outcome (progress display).

    Raises:
        OutputError: ``out_dir`` cannot be created or written (before any pair runs).
    """
    root = check_output_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    summary = CohortSummary(summary_csv=root / "summary.csv")
    for index, pair in enumerate(pairs):
        t0 = time.perf_counter()
        target = root / pair.id
        try:
            report = register_files(
                pair.fixed, pair.moving, solver, target, moving_seg=pair.moving_seg, options=options, qc=qc
            )
            outcome = PairOutcome(pair, True, report=report, output=str(target))
        except IirpError as err:
            outcome = PairOutcome(pair, False, error=str(err))
        except Exception as err:  # noqa: BLE001 - one broken pair must not stop the cohort
            outcome = PairOutcome(pair, False, error=f"{type(err).__name__}: {err}".splitlines()[0])
        outcome.seconds = time.perf_counter() - t0
        summary.outcomes.append(outcome)
        assert summary.summary_csv is not None
        _write_summary(summary.summary_csv, summary.outcomes)
        if on_pair is not None:
            on_pair(index, outcome)
    return summary
