"""Cohort state without Ray: shards, merging shard summaries, resume (integrity checks), dead attempts' leftovers."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import tiny_export

pytest.importorskip("torch")
from typer.testing import CliRunner  # noqa: E402

from iirp.atomic import partial_name  # noqa: E402
from iirp.cli import run_app  # noqa: E402
from iirp.errors import IirpError, OutputError  # noqa: E402
from iirp.runtime import cohort  # noqa: E402
from iirp.runtime.cohort_state import (  # noqa: E402
    Shard,
    SummaryError,
    check_cohort_folder,
    discard_attempt,
    merge_summaries,
    plan_cohort,
)
from iirp.runtime.pairs import ImagePair, read_pairs  # noqa: E402
from iirp.runtime.register import RegistrationOptions  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    return tiny_export(tmp_path_factory.mktemp("cohort_state"))


def _pairs_csv(path: Path, data: dict, ids: list[str], bad: tuple[str, ...] = ()) -> Path:
    broken = path.parent / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["fixed", "moving", "id"])
        for i, pair_id in enumerate(ids):
            moving = broken if pair_id in bad else (data["moving"] if i % 2 == 0 else data["fixed"])
            writer.writerow([data["fixed"], moving, pair_id])
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _cli(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(run_app, [str(a) for a in args])


def _partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".iirp-partial" in p.name]


# --------------------------------------------------------------------------- shards


@settings(max_examples=200, deadline=None)
@given(total=st.integers(0, 60), count=st.integers(1, 12))
def test_shards_cover_every_pair_exactly_once(total: int, count: int) -> None:
    pairs = [ImagePair(f"p{i}", Path("f"), Path("m"), row=i + 1) for i in range(total)]
    slices = [Shard(i, count).select(pairs) for i in range(1, count + 1)]
    assert sorted(p.row for s in slices for p in s) == list(range(1, total + 1))
    assert [len(s) for s in slices] == [Shard(i, count).size(total) for i in range(1, count + 1)]
    assert max(map(len, slices)) - min(map(len, slices)) <= 1
    assert all(s == sorted(s, key=lambda p: p.row) for s in slices)


@pytest.mark.parametrize("text", ["3/2", "0/2", "1/0", "x", "1/2/3", "-1/2", "", "1.5/2"])
def test_shard_spec_errors(text: str) -> None:
    with pytest.raises(IirpError, match=r"--shard must be I/N with 1 <= I <= N"):
        Shard.parse(text)


def test_shard_spec() -> None:
    shard = Shard.parse(" 2 / 8 ")
    assert (shard.index, shard.count, shard.summary_name, str(shard)) == (2, 8, "summary.2-of-8.csv", "2/8")


def test_shard_folder_checks(tmp_path: Path) -> None:
    root = tmp_path / "cohort"
    root.mkdir()
    (root / "summary.2-of-2.csv").write_text("id,status\n")
    (root / "b").mkdir()  # shard 2's pair
    (root / ".summary.2-of-2.csv.abc.part").write_text("being replaced")
    (root / (partial_name() + "x")).mkdir()
    mine = Shard(1, 2)
    assert check_cohort_folder(root, ids=["a"], shard=mine) == root  # the other shard's files are fine
    (root / "a").mkdir()
    with pytest.raises(OutputError, match=r"already holds shard 1/2's outputs \(a\); pass --resume"):
        check_cohort_folder(root, ids=["a"], shard=mine)
    assert check_cohort_folder(root, ids=["a"], shard=mine, resume=True) == root
    (root / "summary.1-of-3.csv").write_text("id,status\n")
    with pytest.raises(OutputError, match=r"summaries of a split into another number of shards"):
        check_cohort_folder(root, ids=["a"], shard=mine, overwrite=True)
    (root / "summary.1-of-3.csv").unlink()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"holds files a cohort run does not write \(notes.txt\)"):
        check_cohort_folder(root, ids=["a"], shard=mine, resume=True)


def _summary(path: Path, rows: list[tuple[str, str]]) -> None:
    path.write_text("id,status,error\n" + "".join(f"{i},{s},{'boom' if s == 'failed' else ''}\n" for i, s in rows))


def test_merge_errors(tmp_path: Path) -> None:
    root = tmp_path / "cohort"
    with pytest.raises(SummaryError, match="not found"):
        merge_summaries(root)
    root.mkdir()
    with pytest.raises(SummaryError, match=r"holds no shard summaries"):
        merge_summaries(root)
    _summary(root / "summary.1-of-2.csv", [("a", "ok"), ("c", "ok")])
    with pytest.raises(SummaryError, match=r"shard 2/2 missing \(no summary.2-of-2.csv\)"):
        merge_summaries(root)
    _summary(root / "summary.2-of-2.csv", [("b", "ok"), ("a", "ok")])
    with pytest.raises(SummaryError, match=r"pair 'a' is in shards 1/2 and 2/2: the summaries overlap"):
        merge_summaries(root)
    _summary(root / "summary.2-of-2.csv", [("b", "ok"), ("d", "ok"), ("e", "ok")])
    with pytest.raises(SummaryError, match=r"summary.1-of-2.csv has 2 rows where one split of 5 pairs into 2 gives 3"):
        merge_summaries(root)
    _summary(root / "summary.2-of-2.csv", [("b", "pending")])
    with pytest.raises(SummaryError, match=r"shard 2/2 has not finished \(1 pair\(s\) pending, first 'b'\)"):
        merge_summaries(root)
    _summary(root / "summary.3-of-3.csv", [("x", "ok")])
    with pytest.raises(SummaryError, match=r"splits into 2 and 3 shards"):
        merge_summaries(root)
    (root / "summary.3-of-3.csv").unlink()
    (root / "summary.2-of-2.csv").write_text("id,status\nb,done\n")
    with pytest.raises(SummaryError, match=r"status 'done'"):
        merge_summaries(root)
    assert not (root / "summary.csv").exists()
    _summary(root / "summary.2-of-2.csv", [("b", "failed")])
    merged = merge_summaries(root)
    assert [r["id"] for r in merged.rows] == ["a", "b", "c"] and [r["id"] for r in merged.failed] == ["b"]
    assert [r["id"] for r in _rows(root / "summary.csv")] == ["a", "b", "c"]


def test_shards_then_merge(exported, tmp_path: Path) -> None:
    """--shard 1/2 and 2/2 into one folder cover the file exactly once; --merge-summaries joins them in order."""
    data, engines = exported
    ids = ["p1", "p2", "bad", "p4", "p5"]
    csv_path = _pairs_csv(tmp_path / "pairs.csv", data, ids, bad=("bad",))
    out = tmp_path / "out"
    base = ["--pairs", csv_path, "--engines", engines, "-o", out, "--iterstop", "rpnet"]
    first = _cli(*base, "--shard", "1/2")
    assert first.exit_code == 1, first.output  # p1, bad, p5: bad fails
    assert "2 of 3 pairs registered" in first.stdout
    not_yet = _cli("--merge-summaries", out)
    assert not_yet.exit_code == 2 and not_yet.stderr.strip().splitlines() == [
        f"iirp-run: error: cohort output folder {out}: shard 2/2 missing (no summary.2-of-2.csv); run it "
        "(--shard 2/2) first"]
    second = _cli(*base, "--shard", "2/2")
    assert second.exit_code == 0, second.output
    assert [r["id"] for r in _rows(out / "summary.1-of-2.csv")] == ["p1", "bad", "p5"]
    assert [r["id"] for r in _rows(out / "summary.2-of-2.csv")] == ["p2", "p4"]
    assert sorted(p.name for p in out.iterdir()) == ["p1", "p2", "p4", "p5", "summary.1-of-2.csv", "summary.2-of-2.csv"]
    again = _cli(*base, "--shard", "2/2")  # a shard's own outputs need --resume or --overwrite
    assert again.exit_code == 2 and "already holds shard 2/2's outputs" in again.stderr

    merged = _cli("--merge-summaries", out)
    assert merged.exit_code == 1, merged.output
    assert "merged 2 shard summaries: 4 of 5 pairs registered" in merged.stdout
    assert merged.stderr.strip() == "iirp-run: 1 pair(s) failed: bad"
    rows = _rows(out / "summary.csv")
    assert [r["id"] for r in rows] == ids and [r["status"] for r in rows] == ["ok", "ok", "failed", "ok", "ok"]
    assert rows[0] == _rows(out / "summary.1-of-2.csv")[0]


# --------------------------------------------------------------------------- resume


def test_resume_redoes_only_what_is_missing_or_changed(exported, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted run, then --resume: only the unfinished pairs run; then a tampered and a deleted output."""
    data, engines = exported
    csv_path = _pairs_csv(tmp_path / "pairs.csv", data, ["p1", "p2", "p3", "p4"])
    out = tmp_path / "out"
    args = ["--pairs", csv_path, "--engines", engines, "-o", out, "--iterstop", "rpnet"]
    real = cohort.register_pair
    calls: list[str] = []

    def _interrupted(pair, *a, **k):  # type: ignore[no-untyped-def]
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the third pair runs
        calls.append(pair.id)
        return real(pair, *a, **k)

    monkeypatch.setattr(cohort, "register_pair", _interrupted)
    stopped = _cli(*args)
    assert stopped.exit_code == 130, stopped.output
    assert stopped.stderr.strip().splitlines()[-1].startswith(
        f"iirp-run: interrupted; 2 pair(s) finished, recorded in {out / 'summary.csv'}")
    assert [(r["id"], r["status"]) for r in _rows(out / "summary.csv")] == [
        ("p1", "ok"), ("p2", "ok"), ("p3", "pending"), ("p4", "pending")]
    stamps = {p: (out / p / "displacement.nii.gz").stat().st_mtime_ns for p in ("p1", "p2")}

    def _counted(pair, *a, **k):  # type: ignore[no-untyped-def]
        calls.append(pair.id)
        return real(pair, *a, **k)

    monkeypatch.setattr(cohort, "register_pair", _counted)
    calls.clear()
    resumed = _cli(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert calls == ["p3", "p4"]
    assert "resume: 2 of 4 pairs kept, 2 to run" in resumed.stderr
    assert "4 of 4 pairs registered (2 kept from an earlier run)" in resumed.stdout
    assert {p: (out / p / "displacement.nii.gz").stat().st_mtime_ns for p in ("p1", "p2")} == stamps
    assert [r["status"] for r in _rows(out / "summary.csv")] == ["ok"] * 4

    flow = out / "p1" / "displacement.nii.gz"
    raw = bytearray(flow.read_bytes())
    raw[-100] ^= 0xFF  # same size, other content
    flow.write_bytes(bytes(raw))
    (out / "p3" / "warped.nii.gz").unlink()
    calls.clear()
    redone = _cli(*args, "--resume")
    assert redone.exit_code == 0, redone.output
    assert calls == ["p1", "p3"]
    assert "p1: displacement.nii.gz has changed (sha256); p3: warped.nii.gz is missing" in redone.stderr
    report = json.loads((out / "p1" / "report.json").read_text())
    assert report["output_files"]["displacement.nii.gz"]["bytes"] == flow.stat().st_size
    calls.clear()
    assert _cli(*args, "--resume").exit_code == 0 and calls == []
    assert not _partials(out)
    both = _cli(*args, "--resume", "--overwrite")
    assert both.exit_code == 2 and "use either --resume" in both.stderr


def test_resume_redoes_pairs_of_other_options_or_inputs(exported, tmp_path: Path) -> None:
    data, engines = exported
    csv_path = _pairs_csv(tmp_path / "pairs.csv", data, ["p1", "p2"])
    out = tmp_path / "out"
    assert _cli("--pairs", csv_path, "--engines", engines, "-o", out, "--iterstop", "rpnet").exit_code == 0
    pairs = read_pairs(csv_path)
    same = plan_cohort(pairs, out, options=RegistrationOptions(iterstop="rpnet"), resume=True)
    assert sorted(same.kept) == ["p1", "p2"] and not same.todo
    other = plan_cohort(pairs, out, options=RegistrationOptions(iterstop="paper"), resume=True)
    assert [p.id for p in other.todo] == ["p1", "p2"]
    assert other.redo["p1"] == "it was registered with iterstop 'rpnet', now 'paper'"
    with_qc = plan_cohort(pairs, out, options=RegistrationOptions(iterstop="rpnet"), qc=True, resume=True)
    assert with_qc.redo["p2"] == "it has no qc.png"
    model = plan_cohort(pairs, out, options=RegistrationOptions(iterstop="rpnet"), resume=True, source_sha256="0" * 64)
    assert model.redo["p1"] == "it was registered with another model (source sha256 differs)"
    swapped = [pairs[0], ImagePair("p2", pairs[0].moving, pairs[0].fixed)]
    moved = plan_cohort(swapped, out, options=RegistrationOptions(iterstop="rpnet"), resume=True)
    assert moved.redo["p2"].startswith("its fixed was")


# --------------------------------------------------------------------------- leftovers, no Ray


def test_discard_attempt_removes_only_the_dead_attempts_leftovers(tmp_path: Path) -> None:
    folder = tmp_path / "p1"
    folder.mkdir()
    dead = folder / ".iirp-partial-hostb-4242-abc"
    dead.mkdir()
    (dead / "warped.nii.gz").write_bytes(b"half")
    alive = folder / ".iirp-partial-hostb-77-xyz"
    alive.mkdir()
    (folder / "warped.nii.gz").write_bytes(b"published before the marker")
    discard_attempt(folder, ".iirp-partial-hostb-4242-")
    assert sorted(p.name for p in folder.iterdir()) == [alive.name]  # another process's partial stays
    alive.rmdir()
    discard_attempt(folder, ".iirp-partial-hostb-4242-")
    assert not folder.exists()
    complete = tmp_path / "p2"
    complete.mkdir()
    for name in ("warped.nii.gz", "report.json", "notes.txt"):
        (complete / name).write_text(name)
    discard_attempt(complete, ".iirp-partial-hostb-4242-")
    assert sorted(p.name for p in complete.iterdir()) == ["notes.txt", "report.json", "warped.nii.gz"]


def test_ray_missing_is_one_line(exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, engines = exported
    csv_path = _pairs_csv(tmp_path / "pairs.csv", data, ["p1"])
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    out = tmp_path / "out"
    result = _cli("--pairs", csv_path, "--engines", engines, "-o", out, "--ray", "local")
    assert result.exit_code == 2 and not result.stdout
    assert result.stderr.strip().splitlines() == [
        "iirp-run: error: --ray needs Ray, which is not installed: pip install 'iirp[ray]'"]
    assert not out.exists()


def test_shared_folder_token_check(tmp_path: Path) -> None:
    """A Ray worker proves it sees the cohort folder as the driver does: the driver's token, read there."""
    from iirp.runtime.cluster import _check_token

    token_dir = tmp_path / "cohort" / ".iirp-partial-driverhost-1-abc"
    assert "it must be on a filesystem every Ray worker shares" in _check_token(str(token_dir), "secret")
    assert "token" in _check_token(str(token_dir), "secret") and "is missing here" in _check_token(str(token_dir), "x")
    token_dir.mkdir(parents=True)
    (token_dir / "token").write_text("another run's\n")
    assert "is different here" in _check_token(str(token_dir), "secret")
    (token_dir / "token").write_text("secret\n")
    assert _check_token(str(token_dir), "secret") is None
    assert list(token_dir.iterdir()) == [token_dir / "token"]  # the write probe is gone


def test_a_workers_death_is_one_line() -> None:
    """What 'worker died twice: ...' says, from Ray's multi-line errors."""
    from iirp.runtime.cluster import _death_cause

    class ActorDiedError(Exception):
        pass

    class ActorUnavailableError(Exception):
        pass

    died = ActorDiedError("The actor died unexpectedly before finishing this task.\n\tclass_name: PairWorker\n\t"
                          "actor_id: 9e96\n\tpid: 4242\nThe actor is dead because its worker process has died. Worker "
                          "exit type: SYSTEM_ERROR Worker exit detail: Task was killed due to the node running low on "
                          "memory.")
    assert _death_cause(died) == (
        "The actor died unexpectedly before finishing this task. The actor is dead because its worker process has "
        "died. Worker exit type: SYSTEM_ERROR Worker exit detail: Task was killed due to the node running low on "
        "memory. (ActorDiedError)")
    gone = ActorUnavailableError("The actor 9e96 is unavailable: The actor is temporarily unavailable: RpcError: "
                                 "Socket closed. The task may or may not have been executed on the actor.")
    assert _death_cause(gone).startswith("The actor is temporarily unavailable: RpcError: Socket closed.")
    assert "\n" not in _death_cause(gone) and "9e96" not in _death_cause(gone)
