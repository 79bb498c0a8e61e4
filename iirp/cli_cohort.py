"""``iirp-run --pairs`` and ``iirp-run --merge-summaries``: the cohort commands' options, progress and messages.

The library does the work (:mod:`iirp.runtime.cohort_state` plans, :mod:`iirp.runtime.cohort` runs in this
process, :mod:`iirp.runtime.cluster` on Ray); this module checks the options (one line, exit 2, before
anything is written), shows a progress bar on stderr (done / failed / running, pairs per minute), prints a
line per failed pair and exits 1 when any failed. Ctrl-C / SIGTERM: exit 130 / 143 with the summary left
consistent (finished pairs recorded, the others ``pending`` for ``--resume``).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from iirp import clitools
from iirp.errors import IirpError, Terminated

__all__ = ["CohortRequest", "run_cohort", "merge"]

PROG = "iirp-run"


@dataclass(frozen=True)
class CohortRequest:
    """The cohort-only options of ``iirp-run`` as given (None: not given)."""

    resume: bool = False
    shard: Optional[str] = None
    ray: Optional[str] = None
    workers: Optional[int] = None
    gpus_per_worker: Optional[float] = None
    cpus_per_worker: Optional[float] = None

    def given(self) -> list[str]:
        """The options given, as their flags."""
        flags = {"--resume": self.resume or None, "--shard": self.shard, "--ray": self.ray, "--workers": self.workers,
                 "--gpus-per-worker": self.gpus_per_worker, "--cpus-per-worker": self.cpus_per_worker}
        return [flag for flag, value in flags.items() if value is not None]

    def check(self, overwrite: bool) -> None:
        """The checks that need nothing but the options.

        Raises:
            IirpError: ``--resume`` with ``--overwrite``; Ray's worker options without ``--ray``; a bad ``--shard``.
        """
        from iirp.runtime.cohort_state import Shard

        if self.resume and overwrite:
            raise IirpError("use either --resume (keep finished pairs) or --overwrite (redo every pair), not both")
        if self.ray is None:
            extra = [f for f in ("--workers", "--gpus-per-worker", "--cpus-per-worker") if f in self.given()]
            if extra:
                raise IirpError(f"{', '.join(extra)} need{'s' if len(extra) == 1 else ''} --ray")
        if self.shard is not None:
            Shard.parse(self.shard)

    def cluster(self, verbose: bool) -> Any:
        """The :class:`~iirp.runtime.cluster.ClusterOptions`, or None without ``--ray``."""
        if self.ray is None:
            return None
        from iirp.runtime.cluster import ClusterOptions

        return ClusterOptions(
            address=self.ray.strip(), workers=self.workers,
            gpus_per_worker=0.0 if self.gpus_per_worker is None else self.gpus_per_worker,
            cpus_per_worker=1.0 if self.cpus_per_worker is None else self.cpus_per_worker, verbose=verbose,
        )


class _Display:
    """The progress bar and the lines printed while a cohort runs (stderr)."""

    def __init__(self, todo: int, verbose: bool, starting: str = "registering") -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[state]}"),
            TimeElapsedColumn(), console=Console(stderr=True), transient=False,
        )
        self.task = self.progress.add_task(starting, total=todo, state="")
        self.verbose = verbose
        self.done = self.failed = self.running = 0
        self.t0: Optional[float] = None  # the first pair's start: the rate leaves a cluster's start-up out

    def __enter__(self) -> "_Display":
        self.progress.__enter__()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None or self.t0 is None:  # an error, or no pair ran: the error line stays alone
            self.progress.live.transient = True
        self.progress.__exit__(exc_type, exc, tb)  # type: ignore[arg-type]

    def say(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def event(self, event: Any) -> None:
        from iirp.errors import one_line

        if event.kind == "started":
            self.running += 1
            self.t0 = time.monotonic() if self.t0 is None else self.t0
        elif event.kind == "retrying":
            self.running -= 1
            self.say(f"{PROG}: warning: pair {event.pair.id} (row {event.pair.row}): {one_line(event.detail)}; "
                     "running it once more")
        elif event.kind == "finished":
            self.running = max(0, self.running - 1)
            self.done += 1
            if event.row["status"] != "ok":
                self.failed += 1
                self.say(f"{PROG}: pair {event.pair.id} (row {event.pair.row}) failed: {event.row['error']}")
        elif event.kind == "worker":
            if self.verbose or "dropped" in event.detail or "--workers" in event.detail:
                self.say(f"{PROG}: {one_line(event.detail)}")
        minutes = (time.monotonic() - self.t0) / 60.0 if self.t0 is not None else 0.0
        rate = f", {self.done / minutes:.1f} pairs/min" if self.done and minutes > 0 else ""
        fields: dict[str, Any] = {"state": f"failed {self.failed}, running {self.running}{rate}"}
        if event.kind == "finished":
            fields["description"] = f"registering (last: {event.pair.id})"
        elif event.kind == "started":
            fields["description"] = "registering"
        self.progress.update(self.task, completed=self.done, **fields)


def _stopped_exit(err: KeyboardInterrupt, summary: Path, display: _Display) -> typer.Exit:
    """The line and exit code of a cohort stopped by Ctrl-C or SIGTERM."""
    signum = err.signum if isinstance(err, Terminated) else signal.SIGINT
    what = f"terminated (signal {signum})" if isinstance(err, Terminated) else "interrupted"
    if summary.is_file():
        typer.echo(f"{PROG}: {what}; {display.done} pair(s) finished, recorded in {summary} (the others are "
                   "'pending'); pass --resume to run the rest", err=True)
    else:
        typer.echo(f"{PROG}: {what}; nothing was written", err=True)
    return typer.Exit(128 + signum)


def run_cohort(pairs_csv: Path, out: Path, spec: Any, parse: Callable[[], Any], qc: bool, overwrite: bool,
               request: CohortRequest, verbose: bool) -> None:
    """Cohort mode (``--pairs``): plan, run here or on Ray, report; exit 1 if any pair failed.

    Args:
        spec: the :class:`~iirp.runtime.solver_spec.SolverSpec`.
        parse: builds the :class:`~iirp.runtime.register.RegistrationOptions` (parsing the options: their
            errors are one line), run before anything is read.
    """
    from iirp.runtime.cohort_state import Shard, plan_cohort
    from iirp.runtime.pairs import read_pairs

    cluster = request.cluster(verbose)

    def _prepare():  # type: ignore[no-untyped-def]
        request.check(overwrite)
        if cluster is not None:
            from iirp.runtime.cluster import import_ray

            cluster.check(spec)
            import_ray()
        options = parse()
        spec.check(here=cluster is None)
        if request.resume and options.intensity is None:  # the rule the earlier run recorded: the model's
            options = replace(options, intensity=spec.contract().intensity)
        pair_list = read_pairs(pairs_csv)
        return plan_cohort(
            pair_list, out, options=options, qc=qc, overwrite=overwrite, resume=request.resume,
            shard=Shard.parse(request.shard) if request.shard else None,
            source_sha256=spec.source_sha256() if request.resume else None,
        )

    plan = clitools.guarded(PROG, verbose, _prepare)
    if request.resume and (plan.kept or plan.redo):
        redo = "; ".join(f"{k}: {v}" for k, v in list(plan.redo.items())[:3]) + ("; ..." if len(plan.redo) > 3 else "")
        clitools.log.info("resume: %s", plan.redo)
        typer.echo(f"{PROG}: resume: {len(plan.kept)} of {len(plan.pairs)} pairs kept, {len(plan.todo)} to run"
                   + (f" ({len(plan.redo)} redone: {redo})" if plan.redo else ""), err=True)
    solver = None if cluster is not None or not plan.todo else clitools.guarded(PROG, verbose, spec.build)
    display = _Display(len(plan.todo), verbose, "starting Ray workers" if cluster is not None else "registering")

    def _go():  # type: ignore[no-untyped-def]
        try:
            if cluster is not None:
                from iirp.runtime.cluster import run_plan_on_ray

                return run_plan_on_ray(plan, spec, cluster, on_event=display.event), None
            from iirp.runtime.cohort import run_plan

            return run_plan(plan, solver, on_event=display.event), None
        except KeyboardInterrupt as err:
            return None, err

    with display:
        ledger, stopped = clitools.guarded(PROG, verbose, _go)
    if stopped is not None:
        raise _stopped_exit(stopped, plan.summary_csv, display)
    ok, failed = ledger.with_status("ok"), ledger.with_status("failed")
    kept = f" ({len(plan.kept)} kept from an earlier run)" if plan.kept else ""
    typer.echo(f"{len(ok)} of {len(ledger.order)} pairs registered{kept}; summary: {ledger.path}")
    if failed:
        typer.echo(f"{PROG}: {len(failed)} pair(s) failed: {', '.join(r['id'] for r in failed)}", err=True)
        raise typer.Exit(1)


def merge(folder: Path, verbose: bool) -> None:
    """``--merge-summaries OUT``: join the shard summaries into ``OUT/summary.csv``; exit 1 if any pair failed."""
    from iirp.runtime.cohort_state import merge_summaries

    result = clitools.guarded(PROG, verbose, lambda: merge_summaries(folder))
    ok = sum(r["status"] == "ok" for r in result.rows)
    typer.echo(f"merged {result.shards} shard summaries: {ok} of {len(result.rows)} pairs registered; "
               f"summary: {result.summary_csv}")
    if result.failed:
        typer.echo(f"{PROG}: {len(result.failed)} pair(s) failed: {', '.join(r['id'] for r in result.failed)}",
                   err=True)
        raise typer.Exit(1)
