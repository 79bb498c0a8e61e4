"""Cohort mode: pairs files, one folder per pair, failures reported and skipped."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from support import tiny_export

pytest.importorskip("torch")
from typer.testing import CliRunner  # noqa: E402

from iirp.cli import run_app  # noqa: E402
from iirp.runtime.pairs import PairsFileError, read_pairs  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    return tiny_export(tmp_path_factory.mktemp("cohort"))


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_read_pairs_resolves_paths_and_names(tmp_path: Path) -> None:
    csv_path = _write_csv(tmp_path / "pairs.csv", [
        {"fixed": "a/f.nii.gz", "moving": "/abs/m.nii.gz", "moving_seg": "", "labels": "3; 7 12", "id": ""},
        {"fixed": "f2.nrrd", "moving": "m2.mha", "moving_seg": "s.nii", "labels": "", "id": "my pair/2"},
    ])
    first, second = read_pairs(csv_path)
    assert first.fixed == tmp_path / "a" / "f.nii.gz" and first.moving == Path("/abs/m.nii.gz")
    assert first.moving_seg is None and first.labels == (3, 7, 12) and first.id == "001_m_to_f"
    assert second.moving_seg == tmp_path / "s.nii" and second.labels is None and second.id == "my_pair_2"


@pytest.mark.parametrize(("text", "match"), [
    (None, "not found"),
    ("fixed,other\na,b\n", "has no column 'moving'"),
    ("fixed,moving\n", "lists no pair"),
    ("fixed,moving\na,\n", "row 1: empty 'moving'"),
    ("fixed,moving,labels\na,b,x\n", "'labels' must be integers"),
    ("fixed,moving,id\na,b,p\nc,d,p\n", "duplicate id 'p'"),
])
def test_read_pairs_errors(tmp_path: Path, text: str | None, match: str) -> None:
    path = tmp_path / "pairs.csv"
    if text is not None:
        path.write_text(text)
    with pytest.raises(PairsFileError, match=match):
        read_pairs(path)
    with pytest.raises(PairsFileError, match="no column 'fixed_seg', 'moving_seg'"):
        read_pairs(_write_csv(tmp_path / "p2.csv", [{"fixed": "a", "moving": "b"}]), need_segs=True)


def test_cohort_skips_a_broken_pair_and_reports_it(exported, tmp_path: Path) -> None:
    data, engines = exported
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    csv_path = _write_csv(tmp_path / "pairs.csv", [
        {"fixed": str(data["fixed"]), "moving": str(data["moving"]), "moving_seg": str(data["seg"]), "id": "good1"},
        {"fixed": str(data["fixed"]), "moving": str(broken), "moving_seg": "", "id": "bad"},
        {"fixed": str(data["moving"]), "moving": str(data["fixed"]), "moving_seg": "", "id": "good2"},
    ])
    out = tmp_path / "out"
    result = CliRunner().invoke(run_app, ["--pairs", str(csv_path), "--engines", str(engines), "-o", str(out),
                                          "--iterstop", "rpnet", "--qc"])
    assert result.exit_code == 1, result.output
    assert "pair bad (row 2) failed: cannot read moving image" in result.output
    assert "2 of 3 pairs registered" in result.output
    with open(out / "summary.csv", newline="") as fh:
        rows = {r["id"]: r for r in csv.DictReader(fh)}
    assert [rows[k]["status"] for k in ("good1", "bad", "good2")] == ["ok", "failed", "ok"]
    assert "cannot read moving image" in rows["bad"]["error"] and rows["good1"]["iterations"] == "1 1 1 1"
    assert sorted(p.name for p in (out / "good1").iterdir()) == [
        "displacement.nii.gz", "qc.png", "report.json", "warped.nii.gz", "warped_seg.nii.gz"]
    assert (out / "good2" / "warped.nii.gz").is_file() and not (out / "bad").exists()


def test_cohort_cli_errors(exported, tmp_path: Path) -> None:
    data, engines = exported
    runner = CliRunner()
    result = runner.invoke(run_app, ["--pairs", str(tmp_path / "none.csv"), "--engines", str(engines),
                                     "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "pairs file" in result.output and "not found" in result.output
    result = runner.invoke(run_app, [str(data["fixed"]), "--pairs", str(tmp_path / "none.csv"),
                                     "--engines", str(engines), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--pairs takes its images" in result.output
    assert not (tmp_path / "o").exists()


def test_cohort_rows_name_each_failure_in_one_line(exported, tmp_path: Path) -> None:
    """Every failure is the pair's own one-line reason (no raw library message), and the cohort goes on."""
    import numpy as np
    import SimpleITK as sitk

    data, engines = exported
    complex_image = tmp_path / "complex.nii.gz"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(data["moving"])))
    sitk.WriteImage(sitk.GetImageFromArray((array + 1j * array).astype(np.complex64)), str(complex_image))
    far = sitk.ReadImage(str(data["moving"]))
    far.SetOrigin((0.0, 0.0, 9000.0))
    far_path = tmp_path / "far.nii.gz"
    sitk.WriteImage(far, str(far_path))
    csv_path = _write_csv(tmp_path / "pairs.csv", [
        {"fixed": str(data["fixed"]), "moving": str(complex_image), "id": "complex"},
        {"fixed": str(data["fixed"]), "moving": str(far_path), "id": "far"},
        {"fixed": str(data["fixed"]), "moving": str(data["moving"]), "id": "good"},
    ])
    out = tmp_path / "out"
    result = CliRunner().invoke(run_app, ["--pairs", str(csv_path), "--engines", str(engines), "-o", str(out),
                                          "--iterstop", "rpnet"])
    assert result.exit_code == 1, result.output
    with open(out / "summary.csv", newline="") as fh:
        rows = {r["id"]: r for r in csv.DictReader(fh)}
    assert rows["complex"]["error"].startswith(f"moving image {complex_image} must be a real-valued image, got complex")
    assert "sitk" not in rows["complex"]["error"] and "\n" not in rows["complex"]["error"]
    assert "does not overlap the fixed image" in rows["far"]["error"]
    assert rows["good"]["status"] == "ok"
    assert sorted(p.name for p in out.iterdir()) == ["good", "summary.csv"]


def test_cohort_rerun_needs_overwrite(exported, tmp_path: Path) -> None:
    data, engines = exported
    csv_path = _write_csv(tmp_path / "pairs.csv", [
        {"fixed": str(data["fixed"]), "moving": str(data["moving"]), "id": "p1"},
    ])
    out = tmp_path / "out"
    args = ["--pairs", str(csv_path), "--engines", str(engines), "-o", str(out), "--iterstop", "rpnet"]
    assert CliRunner().invoke(run_app, args).exit_code == 0
    first = (out / "p1" / "report.json").read_bytes()
    again = CliRunner().invoke(run_app, args)
    assert again.exit_code == 2 and "cohort output folder" in again.stderr and "--overwrite" in again.stderr
    assert (out / "p1" / "report.json").read_bytes() == first
    replaced = CliRunner().invoke(run_app, [*args, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert (out / "p1" / "report.json").read_bytes() != first  # a new run (its timings differ)
    assert sorted(p.name for p in out.iterdir()) == ["p1", "summary.csv"]
