"""What a cohort folder holds and what a cohort run has left to do: summaries, shards, resume, merge.

A cohort run writes ``OUT/<id>/`` per pair (all or nothing, ``report.json`` last) and one summary:
``OUT/summary.csv``, or ``OUT/summary.<i>-of-<n>.csv`` for ``--shard i/n``. The summary has one row
per pair of the run, in the order of the pairs file, from the start: ``pending`` until the pair
finishes, then ``ok`` or ``failed`` (with its one-line reason). It is rewritten atomically after
every pair, so at any moment (and after a crash or Ctrl-C) it is consistent: no unfinished pair
is ever ``ok``.

* Shards (:class:`Shard`): ``--shard i/n`` runs rows ``i, i+n, i+2n, ...`` (1-based) of the pairs
  file. The slices of ``1/n .. n/n`` cover every row exactly once whatever the row count, and
  shards may run at the same time into one folder (a SLURM job array).
* Merge (:func:`merge_summaries`): ``summary.<i>-of-<n>.csv`` for i = 1..n joined into
  ``summary.csv`` in the pairs file's order, after checking that every shard is there, finished
  (no ``pending`` row), and that together they are one split of one file (no id twice, each
  shard the size its slice must have).
* Resume (:func:`plan_cohort` with ``resume``): a pair is kept when a summary in the folder (this
  run's own first, then ``summary.csv``, then the other shards') says ``ok`` and its folder still
  holds what that run wrote, checked by :func:`verify_outputs`: ``report.json`` names the same
  inputs, registration options and model, and every output file it lists (``output_files``) has
  the recorded size and sha256. Everything else runs again, replacing what its folder holds.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from iirp.atomic import PARTIAL_PREFIX, write_text
from iirp.errors import IirpError, OutputError
from iirp.runtime.imageio import MARKER, REGISTRATION_OUTPUTS, check_output_dir
from iirp.runtime.pairs import RESERVED_IDS, ImagePair
from iirp.runtime.register import RegistrationOptions
from iirp.typing import PathLike

__all__ = [
    "SUMMARY_COLUMNS", "ROLE", "SummaryError", "Shard", "Ledger", "CohortPlan", "cohort_entry", "pending_row",
    "failed_row", "read_summary", "write_summary", "check_cohort_folder", "plan_cohort", "verify_outputs",
    "discard_attempt", "merge_summaries", "MergeResult",
]

SUMMARY_COLUMNS = (
    "id", "status", "error", "fixed", "moving", "iterations", "estimator_passes", "folding_fraction", "seconds",
    "output",
)
#: Row statuses: finished well, finished with an error, not finished.
STATUSES = ("ok", "failed", "pending")
#: How messages name the cohort's folder.
ROLE = "cohort output folder"
_SHARD_SUMMARY = re.compile(r"^summary\.(\d+)-of-(\d+)\.csv$", re.IGNORECASE)
_SHARD_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


class SummaryError(IirpError):
    """A summary CSV is unreadable, or shard summaries cannot be merged."""


def cohort_entry(entry: Path) -> bool:
    """True for what an earlier cohort run leaves in its folder: summary CSVs and pair folders."""
    return (entry.is_file() and RESERVED_IDS.match(entry.name) is not None) or (
        entry.is_dir() and not entry.is_symlink() and not entry.name.startswith(".")
    )


def _transient(name: str) -> bool:
    """A hidden name another run of this cohort may hold for a moment: a partial folder, a summary being replaced."""
    return name.startswith(".") and (PARTIAL_PREFIX in name or name.endswith(".part"))


# --------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Shard:
    """The ``index``-th of ``count`` deterministic slices of a pairs file (``--shard index/count``, 1-based).

    Slice ``i`` holds the pairs at 0-based positions ``i-1, i-1+n, i-1+2n, ...`` (data rows
    ``i, i+n, ...``): the ``n`` slices cover every pair exactly once, their sizes differ by at most one,
    and the slices do not depend on anything but the file.
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if not (isinstance(self.index, int) and isinstance(self.count, int) and 1 <= self.index <= self.count):
            raise IirpError(f"--shard must be I/N with 1 <= I <= N, got {self.index}/{self.count}")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"i/n"`` -> Shard.

        Raises:
            IirpError: not two integers ``I/N`` with ``1 <= I <= N``.
        """
        match = _SHARD_SPEC.match(text or "")
        if match is None:
            raise IirpError(f"--shard must be I/N with 1 <= I <= N (e.g. 2/8), got {text!r}")
        return cls(int(match[1]), int(match[2]))

    def select(self, pairs: list[ImagePair]) -> list[ImagePair]:
        """This shard's pairs, in the file's order."""
        return pairs[self.index - 1::self.count]

    def size(self, total: int) -> int:
        """How many of ``total`` pairs this shard holds."""
        return len(range(self.index - 1, total, self.count))

    @property
    def summary_name(self) -> str:
        return f"summary.{self.index}-of-{self.count}.csv"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


# --------------------------------------------------------------------------- summary rows and files


def pending_row(pair: ImagePair) -> dict[str, str]:
    """The row of a pair that has not finished."""
    return {**dict.fromkeys(SUMMARY_COLUMNS, ""), "id": pair.id, "status": "pending", "fixed": str(pair.fixed),
            "moving": str(pair.moving)}


def failed_row(pair: ImagePair, error: str, seconds: float = 0.0) -> dict[str, str]:
    """The row of a pair that failed outside the registration itself (e.g. its worker died twice)."""
    return {**pending_row(pair), "status": "failed", "error": error, "seconds": f"{seconds:.2f}"}


def write_summary(path: Path, rows: list[dict[str, str]]) -> None:
    """A summary CSV (:data:`SUMMARY_COLUMNS`, one row per pair), replaced atomically."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    write_text(path, text.getvalue())


def read_summary(path: Path) -> list[dict[str, str]]:
    """The rows of a summary CSV.

    Raises:
        SummaryError: unreadable, no ``id``/``status`` columns, or a status not in :data:`STATUSES`.
    """
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            rows = [{c: (r.get(c) or "") for c in SUMMARY_COLUMNS} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SummaryError(f"cannot read the cohort summary {path}: {err}") from err
    if "id" not in header or "status" not in header:
        raise SummaryError(f"{path} is not a cohort summary (no 'id' and 'status' columns)")
    for number, row in enumerate(rows, start=1):
        if row["status"] not in STATUSES or not row["id"]:
            raise SummaryError(f"{path}, row {number}: status {row['status']!r} / id {row['id']!r} is not a "
                               f"summary row (status must be {', '.join(STATUSES)})")
    return rows


class Ledger:
    """A run's summary: one row per pair of the run, in the pairs file's order, on disk after every change.

    Args:
        path: the summary CSV.
        pairs: the run's pairs.
        kept: rows carried over from an earlier run (resume), by pair id; the others start ``pending``.
    """

    def __init__(self, path: Path, pairs: list[ImagePair], kept: Optional[dict[str, dict[str, str]]] = None) -> None:
        self.path = path
        self.order = [p.id for p in pairs]
        kept = kept or {}
        self.rows = {p.id: dict(kept[p.id]) if p.id in kept else pending_row(p) for p in pairs}

    def record(self, row: dict[str, str]) -> None:
        """Set a pair's row and rewrite the summary.

        Raises:
            OutputError: the summary cannot be written.
        """
        assert row["id"] in self.rows, row["id"]
        self.rows[row["id"]] = dict(row)
        self.write()

    def write(self) -> None:
        write_summary(self.path, [self.rows[i] for i in self.order])

    def with_status(self, status: str) -> list[dict[str, str]]:
        """The rows of one status, in order."""
        return [self.rows[i] for i in self.order if self.rows[i]["status"] == status]


# --------------------------------------------------------------------------- the cohort folder


def check_cohort_folder(out_dir: PathLike, *, ids: list[str], overwrite: bool = False, resume: bool = False,
                        shard: Optional[Shard] = None) -> Path:
    """Check, before any work, that ``out_dir`` can take this run's outputs; returns it, absolute.

    * No shard: ``out_dir`` must be new or empty; with ``overwrite`` or ``resume`` it may hold an earlier
      cohort (summary CSVs and pair folders) and nothing else, and no other run may be writing there.
    * ``shard``: other shards of the same split may be running into the same folder, so their summaries
      and pair folders are accepted (and the moments their files are replaced); this shard's own summary
      and pair folders need ``overwrite`` or ``resume``; summaries of a split into another number of
      shards are refused (they could never be merged with this one).

    Raises:
        OutputError: see above; also a file in the way or an unwritable folder
            (:func:`~iirp.atomic.check_output_folder`).
    """
    if shard is None:
        return check_output_dir(out_dir, overwrite=overwrite or resume, owned=cohort_entry, role=ROLE)
    root = check_output_dir(out_dir, role=ROLE)  # a folder (or can become one), writable
    if not root.exists():
        return root
    mine = {i.lower() for i in ids}
    foreign, own, other_split = [], [], []
    for entry in sorted(root.iterdir()):
        name = entry.name
        if _transient(name):
            continue
        if not cohort_entry(entry):
            foreign.append(name)
            continue
        match = _SHARD_SUMMARY.match(name)
        if match and int(match[2]) != shard.count:
            other_split.append(name)
        elif name.lower() == shard.summary_name or (entry.is_dir() and name.lower() in mine):
            own.append(name)
    if foreign:
        raise OutputError(f"{ROLE} {root} holds files a cohort run does not write ({', '.join(foreign[:4])}): "
                          "choose a new or empty folder")
    if other_split:
        raise OutputError(f"{ROLE} {root} holds summaries of a split into another number of shards "
                          f"({', '.join(other_split[:4])}); this run is shard {shard}: remove them or choose "
                          "another folder")
    if own and not (overwrite or resume):
        shown = ", ".join(own[:4]) + (f" and {len(own) - 4} more" if len(own) > 4 else "")
        raise OutputError(f"{ROLE} {root} already holds shard {shard}'s outputs ({shown}); pass --resume to "
                          "finish them or --overwrite to replace them")
    return root


# --------------------------------------------------------------------------- resume


def _recorded_options(options: RegistrationOptions) -> dict[str, object]:
    """What ``report.json`` records of ``options`` (see :func:`~iirp.runtime.register.register_images`).

    An intensity rule left to the model (None) is not compared: ``iirp-run --resume`` resolves it to the
    model's rule first, and the model itself is compared by its sha256.
    """
    rule = options.rule
    recorded: dict[str, object] = {"iterstop": rule.name, "delta": rule.delta, "max_iters": rule.max_iters}
    if options.intensity is not None:
        recorded["intensity"] = options.intensity.spec  # type: ignore[union-attr]
    return {
        **recorded,
        "pre_alignment": ("initial_transform" if options.initial_transform is not None
                          else "affine" if options.affine else None),
    }


def verify_outputs(folder: Path, pair: ImagePair, options: RegistrationOptions, *, qc: bool = False,
                   source_sha256: Optional[str] = None) -> Optional[str]:
    """Why ``folder`` does not hold this pair's complete, intact outputs, or None when it does.

    Checks ``report.json``: the pair's inputs, the registration options and (when given) the model's
    sha256 are the ones recorded; every file of ``output_files`` is present with its recorded size
    and sha256; the set has what this run would write (labels, QC picture, affine).
    """
    from iirp.manifest import sha256_file

    try:
        report = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no readable report.json"
    files = report.get("output_files") if isinstance(report, dict) else None
    if not isinstance(files, dict) or not files:
        return "report.json lists no output checksums (an older iirp wrote it)"
    inputs = report.get("inputs") or {}
    expected = {"fixed": str(pair.fixed), "moving": str(pair.moving),
                "moving_seg": str(pair.moving_seg) if pair.moving_seg is not None else None,
                "initial_transform": str(options.initial_transform) if options.initial_transform is not None else None}
    for key, value in expected.items():
        if inputs.get(key) != value:
            return f"its {key} was {inputs.get(key)!r}, now {value!r}"
    for option, now in _recorded_options(options).items():
        if report.get(option) != now:
            return f"it was registered with {option} {report.get(option)!r}, now {now!r}"
    if source_sha256 is not None and report.get("source_sha256") != source_sha256:
        return "it was registered with another model (source sha256 differs)"
    needed = {"warped.nii.gz", "displacement.nii.gz"}
    needed |= {"warped_seg.nii.gz"} if pair.moving_seg is not None else set()
    needed |= {"qc.png"} if qc else set()
    needed |= {"affine.tfm"} if expected["initial_transform"] or options.affine else set()
    if needed - set(files):
        return f"it has no {', '.join(sorted(needed - set(files)))}"
    for name, record in files.items():
        if name not in REGISTRATION_OUTPUTS or not isinstance(record, dict):
            return f"report.json lists an unexpected output {name!r}"
        path = folder / name
        try:
            if not path.is_file() or path.is_symlink():
                return f"{name} is missing"
            if path.stat().st_size != record.get("bytes"):
                return f"{name} has changed (size)"
            if sha256_file(path) != record.get("sha256"):
                return f"{name} has changed (sha256)"
        except OSError as err:
            return f"{name} cannot be read ({err.strerror or err})"
    return None


def _earlier_rows(root: Path, own: str) -> list[dict[str, str]]:
    """The ``ok`` rows of every summary in ``root``: ``own`` first, then ``summary.csv``, then the shards'."""
    names = [own, "summary.csv"] + sorted(p.name for p in root.iterdir() if _SHARD_SUMMARY.match(p.name))
    rows: list[dict[str, str]] = []
    for name in dict.fromkeys(names):
        path = root / name
        if path.is_file():
            rows.extend(r for r in read_summary(path) if r["status"] == "ok")
    return rows


@dataclass
class CohortPlan:
    """What a cohort run is to do (nothing is written while it is made: :func:`plan_cohort`).

    Attributes:
        root: the cohort folder (absolute; created when the run starts).
        pairs: the run's pairs (the shard's slice), in file order, paths absolute.
        todo: the pairs to register.
        kept: rows of pairs an earlier run finished (resume), by id.
        redo: why an earlier ``ok`` row was not kept (resume), by id.
        summary_csv: the summary the run writes.
        replace: a pair's folder may hold earlier outputs, replaced as a set (``overwrite`` or ``resume``).
        options, qc: the registration options and ``--qc``.
        shard: the slice, or None for the whole file.
    """

    root: Path
    pairs: list[ImagePair]
    todo: list[ImagePair]
    summary_csv: Path
    options: RegistrationOptions = RegistrationOptions()
    qc: bool = False
    replace: bool = False
    shard: Optional[Shard] = None
    kept: dict[str, dict[str, str]] = field(default_factory=dict)
    redo: dict[str, str] = field(default_factory=dict)

    def ledger(self) -> Ledger:
        """The run's summary, kept rows in place and every other pair ``pending`` (not written yet)."""
        return Ledger(self.summary_csv, self.pairs, self.kept)


def _absolute(pair: ImagePair) -> ImagePair:
    def _abs(p: Optional[Path]) -> Optional[Path]:
        return None if p is None else Path(os.path.abspath(p))

    return dataclasses.replace(pair, fixed=Path(os.path.abspath(pair.fixed)), moving=Path(os.path.abspath(pair.moving)),
                               fixed_seg=_abs(pair.fixed_seg), moving_seg=_abs(pair.moving_seg))


def plan_cohort(pairs: list[ImagePair], out_dir: PathLike, *, options: RegistrationOptions = RegistrationOptions(),
                qc: bool = False, overwrite: bool = False, resume: bool = False, shard: Optional[Shard] = None,
                source_sha256: Optional[str] = None) -> CohortPlan:
    """Check the cohort folder and decide what the run does; writes nothing.

    Args:
        pairs: the whole pairs file (:func:`~iirp.runtime.pairs.read_pairs`).
        out_dir: the cohort folder.
        overwrite: replace earlier outputs (every pair runs).
        resume: keep the pairs an earlier run finished whose outputs are intact (see the module
            docstring); run the others.
        shard: run only this slice and write its own summary.
        source_sha256: the model's sha256 (``report.json``'s ``source_sha256``); with ``resume``, outputs
            of another model are not kept. None: not checked.

    Raises:
        IirpError: ``overwrite`` with ``resume``; an unusable folder (:func:`check_cohort_folder`); an
            unreadable summary (resume).
    """
    if overwrite and resume:
        raise IirpError("use either --resume (keep finished pairs) or --overwrite (redo every pair), not both")
    mine = [_absolute(p) for p in (shard.select(pairs) if shard is not None else pairs)]
    root = check_cohort_folder(out_dir, ids=[p.id for p in mine], overwrite=overwrite, resume=resume, shard=shard)
    summary_csv = root / (shard.summary_name if shard is not None else "summary.csv")
    plan = CohortPlan(root, mine, list(mine), summary_csv, options, qc, overwrite or resume, shard)
    if not resume or not root.is_dir():
        return plan
    earlier: dict[str, dict[str, str]] = {}
    for row in _earlier_rows(root, summary_csv.name):
        earlier.setdefault(row["id"], row)
    candidates = [p for p in mine if p.id in earlier]

    def _check(pair: ImagePair) -> Optional[str]:
        return verify_outputs(root / pair.id, pair, options, qc=qc, source_sha256=source_sha256)

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        verdicts = dict(zip((p.id for p in candidates), pool.map(_check, candidates)))  # hashing releases the GIL
    for pair in candidates:
        why = verdicts[pair.id]
        if why is None:
            plan.kept[pair.id] = {**earlier[pair.id], "output": str(root / pair.id)}
        else:
            plan.redo[pair.id] = why
    plan.todo = [p for p in mine if p.id not in plan.kept]
    return plan


# --------------------------------------------------------------------------- a dead attempt's leftovers


def discard_attempt(folder: Path, partial_prefix: str) -> None:
    """Remove what a dead attempt at a pair left in its folder: its partial folders (names starting with
    ``partial_prefix``, see :func:`iirp.atomic.partial_name`) and, when there is no ``report.json``, a
    half-published set (our output names only); the folder itself when it is then empty.

    Nothing else is touched: a complete set (``report.json`` present) stays; another file stays.
    """
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(partial_prefix) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
    if (folder / MARKER).exists():
        return
    for name in REGISTRATION_OUTPUTS:
        path = folder / name
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
    try:
        folder.rmdir()  # only when empty
    except OSError:
        pass


# --------------------------------------------------------------------------- merge


@dataclass
class MergeResult:
    """What :func:`merge_summaries` joined.

    Attributes:
        rows: the merged rows, in the pairs file's order.
        summary_csv: ``OUT/summary.csv``.
        shards: how many shard summaries were joined.
    """

    rows: list[dict[str, str]]
    summary_csv: Path
    shards: int

    @property
    def failed(self) -> list[dict[str, str]]:
        return [r for r in self.rows if r["status"] == "failed"]


def merge_summaries(out_dir: PathLike) -> MergeResult:
    """Join ``OUT/summary.<i>-of-<n>.csv`` (i = 1..n) into ``OUT/summary.csv`` (replaced atomically).

    Raises:
        SummaryError: no folder or no shard summaries; summaries of different splits; a shard missing or
            numbered beyond ``n``; an unreadable summary; a pair id in two shards; shard sizes that are not
            one split of one file; a shard with ``pending`` rows (not finished). Nothing is written then.
    """
    root = Path(os.fspath(out_dir)).absolute()
    if not root.is_dir():
        raise SummaryError(f"{ROLE} {root} {'is not a folder' if root.exists() else 'not found'}")
    found: dict[tuple[int, int], Path] = {}
    for entry in sorted(root.iterdir()):
        match = _SHARD_SUMMARY.match(entry.name)
        if match and entry.is_file():
            found[(int(match[1]), int(match[2]))] = entry
    if not found:
        raise SummaryError(f"{ROLE} {root} holds no shard summaries (summary.<i>-of-<n>.csv); run the shards "
                           "(iirp-run --pairs ... --shard I/N) first")
    counts = sorted({n for _, n in found})
    if len(counts) > 1:
        raise SummaryError(f"{ROLE} {root} holds summaries of splits into {' and '.join(map(str, counts))} shards "
                           f"({', '.join(p.name for p in found.values())}); keep one split")
    n = counts[0]
    beyond = [p.name for (i, _), p in found.items() if not 1 <= i <= n]
    if beyond:
        raise SummaryError(f"{ROLE} {root}: {', '.join(beyond)} is not a shard of {n} (shards are 1..{n})")
    missing = [i for i in range(1, n + 1) if (i, n) not in found]
    if missing:
        raise SummaryError(f"{ROLE} {root}: shard {', '.join(f'{i}/{n}' for i in missing)} missing (no "
                           f"{Shard(missing[0], n).summary_name}); run it (--shard {missing[0]}/{n}) first")
    shards = [read_summary(found[(i, n)]) for i in range(1, n + 1)]
    seen: dict[str, int] = {}
    for i, rows in enumerate(shards, start=1):
        for row in rows:
            other = seen.get(row["id"].lower())
            if other is not None:
                where = f"shards {other}/{n} and {i}/{n}" if other != i else f"shard {i}/{n} twice"
                raise SummaryError(f"{ROLE} {root}: pair {row['id']!r} is in {where}: the summaries overlap "
                                   "(were the shards split from different pairs files?)")
            seen[row["id"].lower()] = i
    total = sum(len(rows) for rows in shards)
    for i, rows in enumerate(shards, start=1):
        if len(rows) != Shard(i, n).size(total):
            raise SummaryError(f"{ROLE} {root}: {Shard(i, n).summary_name} has {len(rows)} rows where one split of "
                               f"{total} pairs into {n} gives {Shard(i, n).size(total)} (shards of different pairs "
                               "files?)")
        pending = [r["id"] for r in rows if r["status"] == "pending"]
        if pending:
            raise SummaryError(f"{ROLE} {root}: shard {i}/{n} has not finished ({len(pending)} pair(s) pending, "
                               f"first {pending[0]!r}); finish it with --shard {i}/{n} --resume")
    merged = [shards[k % n][k // n] for k in range(total)]
    summary_csv = root / "summary.csv"
    write_summary(summary_csv, merged)
    return MergeResult(merged, summary_csv, n)
