"""Cohort runs: many pairs, one solver, one output folder per pair, a summary that survives failures.

A pair that fails (missing or bad image, any error while registering it) is
recorded in the summary with its one-line reason and skipped; the others go
on. The summary (:mod:`.cohort_state`: one row per pair, ``pending`` until it
finishes) is rewritten atomically after every pair, so an interrupted run
still leaves an accurate record of what finished. Shards, resume and merging
are planned in :mod:`.cohort_state`; the same plan runs here, in this process,
or on a Ray cluster (:mod:`.cluster`), pair by pair through :func:`register_pair`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from iirp.atomic import os_error_text
from iirp.errors import IirpError, OutputError, one_line
from iirp.runtime.cohort_state import (
    SUMMARY_COLUMNS,
    CohortPlan,
    Ledger,
    Shard,
    cohort_entry,
    plan_cohort,
)
from iirp.runtime.pairs import ImagePair, PairsFileError, check_pair_id
from iirp.runtime.register import RegistrationOptions, register_files
from iirp.runtime.solvers import FlowSolver
from iirp.typing import PathLike

__all__ = [
    "PairOutcome", "CohortSummary", "CohortEvent", "register_pair", "run_plan", "register_cohort", "cohort_entry",
    "SUMMARY_COLUMNS",
]


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
    """All outcomes of the pairs this run registered, in the order of the pairs file, and its summary.

    Attributes:
        outcomes: the pairs registered by this run (a resumed run's kept pairs are not among them).
        summary_csv: the summary written.
        ledger: every row of the summary (kept, ok, failed).
    """

    outcomes: list[PairOutcome] = field(default_factory=list)
    summary_csv: Optional[Path] = None
    ledger: Optional[Ledger] = None

    @property
    def failed(self) -> list[PairOutcome]:
        return [o for o in self.outcomes if not o.ok]


@dataclass(frozen=True)
class CohortEvent:
    """What a cohort run reports while it goes (progress display).

    Attributes:
        kind: ``started`` (a pair was handed to a solver), ``finished`` (its row is in the summary),
            ``retrying`` (its worker died; it runs again), ``worker`` (a Ray worker is ready, or was
            dropped: ``detail`` says which).
        pair: the pair (``started``, ``finished``, ``retrying``).
        row: the pair's summary row (``finished``).
        detail: a one-line remark (the cause of a retry, a worker's placement).
    """

    kind: str
    pair: Optional[ImagePair] = None
    row: Optional[dict[str, str]] = None
    detail: str = ""


def _pair_folder(root: Path, pair: ImagePair) -> Path:
    """``root/<id>``, checked to be a direct child of ``root`` (ids are checked by :mod:`.pairs` already)."""
    target = root / check_pair_id(pair.id, f"pair {pair.id!r}")
    if target.parent != root or target.name != pair.id:
        raise PairsFileError(f"pair id {pair.id!r} does not name a folder inside {root}")
    return target


def register_pair(
    pair: ImagePair,
    solver: FlowSolver,
    root: Path,
    *,
    options: RegistrationOptions = RegistrationOptions(),
    qc: bool = False,
    overwrite: bool = False,
) -> PairOutcome:
    """Register one pair into ``root/<id>/`` (:func:`register_files`, all or nothing); never raises for the pair's
    own problems: they are the outcome's one-line ``error``.

    Args:
        overwrite: the pair's folder may hold an earlier set of outputs, replaced as a whole.
    """
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
    return outcome


def make_root(root: Path) -> None:
    """Create the cohort folder.

    Raises:
        OutputError: it cannot be created.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cohort output folder {root} cannot be created: {os_error_text(err)}") from err


def run_plan(
    plan: CohortPlan,
    solver: FlowSolver,
    *,
    on_event: Optional[Callable[[CohortEvent], None]] = None,
    on_outcome: Optional[Callable[[PairOutcome], None]] = None,
) -> Ledger:
    """Register ``plan.todo`` one after another in this process; the summary is on disk from the start.

    Args:
        on_event: progress (:class:`CohortEvent`).
        on_outcome: each registered pair's full outcome (report included).

    Returns:
        The summary's rows.

    Raises:
        OutputError: the folder or the summary cannot be written.
    """
    make_root(plan.root)
    ledger = plan.ledger()
    ledger.write()
    for pair in plan.todo:
        if on_event is not None:
            on_event(CohortEvent("started", pair))
        outcome = register_pair(pair, solver, plan.root, options=plan.options, qc=plan.qc, overwrite=plan.replace)
        row = outcome.row()
        ledger.record(row)
        if on_outcome is not None:
            on_outcome(outcome)
        if on_event is not None:
            on_event(CohortEvent("finished", pair, row=row))
    return ledger


def register_cohort(
    pairs: list[ImagePair],
    solver: FlowSolver,
    out_dir: PathLike,
    *,
    options: RegistrationOptions = RegistrationOptions(),
    qc: bool = False,
    overwrite: bool = False,
    on_pair: Optional[Callable[[int, PairOutcome], None]] = None,
    resume: bool = False,
    shard: Optional[Shard] = None,
) -> CohortSummary:
    """Register every pair with ``solver`` into ``out_dir/<pair id>/`` and write ``out_dir/summary.csv``.

    Each pair's folder holds what :func:`register_files` writes (all or nothing). The
    moving labels (``moving_seg``) are warped when the pair names them.

    Args:
        overwrite: accept an ``out_dir`` that holds an earlier cohort (summary CSVs and pair folders) and
            replace each pair's earlier outputs; without it ``out_dir`` must be empty or new.
        on_pair: called after each registered pair with its 0-based index among them and its outcome.
        resume: keep the pairs an earlier run finished, outputs intact; register the rest
            (:func:`~iirp.runtime.cohort_state.plan_cohort`).
        shard: register only this slice of ``pairs``; the summary is ``summary.<i>-of-<n>.csv``.

    Raises:
        OutputError: ``out_dir`` cannot be created or written, or is not empty without ``overwrite``
            (before any pair runs).
        IirpError: ``overwrite`` with ``resume``; an unreadable earlier summary.
    """
    plan = plan_cohort(pairs, out_dir, options=options, qc=qc, overwrite=overwrite, resume=resume, shard=shard)
    summary = CohortSummary(summary_csv=plan.summary_csv)

    def _collect(outcome: PairOutcome) -> None:
        summary.outcomes.append(outcome)
        if on_pair is not None:
            on_pair(len(summary.outcomes) - 1, outcome)

    summary.ledger = run_plan(plan, solver, on_outcome=_collect)
    return summary
