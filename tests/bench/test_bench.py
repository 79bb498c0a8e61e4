"""iirp-bench latency and accuracy on a tiny export: reports written, numbers consistent."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from support import tiny_export

pytest.importorskip("torch")
from typer.testing import CliRunner  # noqa: E402

from iirp.bench.latency import STAGES  # noqa: E402
from iirp.cli import bench_app  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    return tiny_export(tmp_path_factory.mktemp("bench"))


def test_latency_report(exported, tmp_path: Path) -> None:
    data, engines = exported
    out = tmp_path / "lat"
    result = CliRunner().invoke(bench_app, [
        "latency", "--engines", str(engines), "--engine", "ort", "--pair", str(data["fixed"]), str(data["moving"]),
        "--repeats", "2", "--warmup", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "reference: median" in result.output and "ort-fp32: median" in result.output
    payload = json.loads((out / "latency.json").read_text())
    reference, ort = payload["engines"]
    assert reference["baseline"] and reference["engine"] == "reference" and not ort["baseline"]
    for e in (reference, ort):
        assert e["runs"] == 2 and len(e["end_to_end_ms"]) == 2
        assert e["min_ms"] <= e["median_ms"] <= e["p90_ms"]
        assert set(e["stages_median_ms"]) <= set(STAGES) and "features" in e["stages_median_ms"]
        # stage rows plus the unclocked rest make up the median end-to-end time
        assert sum(e["stages_median_ms"].values()) + e["other_ms"] == pytest.approx(e["median_ms"])
        assert e["iterations_match_reference"] and e["pairs_per_s"] == pytest.approx(1e3 / e["median_ms"])
    assert ort["speedup_vs_reference"] == pytest.approx(reference["median_ms"] / ort["median_ms"])
    assert payload["environment"]["cpu"] and payload["config"]["shape"] == [32, 32, 32]
    md = (out / "latency.md").read_text()
    assert "| reference | cpu | fp32 |" in md and "speedup vs reference" in md
    assert (out / "latency.png").read_bytes()[:4] == b"\x89PNG"


def test_latency_rejects_a_moved_checkpoint(exported, tmp_path: Path) -> None:
    data, engines = exported
    other = tmp_path / "other.pt"
    other.write_bytes(Path(data["ckpt"]).read_bytes() + b"x")
    result = CliRunner().invoke(bench_app, [
        "latency", "--engines", str(engines), "--checkpoint", str(other),
        "--pair", str(data["fixed"]), str(data["moving"]), "-o", str(tmp_path / "lat")])
    assert result.exit_code == 2 and "is not the one" in result.output and "sha256 differs" in result.output
    assert not (tmp_path / "lat").exists()


def _pairs_csv(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["fixed", "moving", "fixed_seg", "moving_seg", "id"])
        writer.writerow([data["fixed"], data["moving"], data["seg"], data["seg"], "a"])
        writer.writerow([data["moving"], data["fixed"], data["seg"], data["seg"], "b"])
    return path


def test_accuracy_report(exported, tmp_path: Path) -> None:
    data, engines = exported
    out = tmp_path / "acc"
    result = CliRunner().invoke(bench_app, [
        "accuracy", "--engines", str(engines), "--pairs", str(_pairs_csv(tmp_path, data)),
        "--methods", "identity,rpnet,fixed:1,0,0,2", "--qc", "-o", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "accuracy.json").read_text())
    assert payload["methods"] == ["identity", "rpnet", "fixed:1,0,0,2"]
    results = {(r["pair"], r["method"]): r for r in payload["results"]}
    assert len(results) == 6
    identity = results[("a", "identity")]
    # same label map on both sides and no deformation: perfect overlap, no folding
    assert identity["dice"] == 1.0 and identity["hd95_mm"] == 0.0 and identity["folding_fraction"] == 0.0
    assert identity["iterations"] == [0, 0, 0, 0] and identity["labels"] == 3
    assert results[("a", "fixed:1,0,0,2")]["iterations"] == [1, 0, 0, 2]
    for r in payload["results"]:
        assert 0.0 <= r["dice"] <= 1.0 and r["seconds"] > 0 and set(r["dice_per_label"]) == {"3", "7", "12"}
    summary = payload["summary"]["rpnet"]
    dice = [results[(p, "rpnet")]["dice"] for p in ("a", "b")]
    assert summary["dice_mean"] == pytest.approx(np.mean(dice)) and summary["dice_std"] == pytest.approx(np.std(dice))
    md = (out / "accuracy.md").read_text()
    assert "## a" in md and "affine only" in md and "The paper's figures" in md
    assert (out / "accuracy_dice.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "qc").iterdir()) == sorted(
        f"{p}_{m}.png" for p in "ab" for m in ("identity", "rpnet", "fixed-1-0-0-2"))


def test_accuracy_errors(exported, tmp_path: Path) -> None:
    data, engines = exported
    runner = CliRunner()
    csv_path = _pairs_csv(tmp_path, data)
    result = runner.invoke(bench_app, ["accuracy", "--pairs", str(csv_path), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "exactly one of --checkpoint" in result.output
    result = runner.invoke(bench_app, ["accuracy", "--engines", str(engines), "--pairs", str(csv_path),
                                       "--methods", "rpnet,bogus", "-o", str(tmp_path / "x")])
    assert result.exit_code != 0 and "bogus" in result.output
    bad = tmp_path / "bad.csv"
    bad.write_text(f"fixed,moving,fixed_seg,moving_seg\n{data['fixed']},{tmp_path / 'missing.nii.gz'},"
                   f"{data['seg']},{data['seg']}\n")
    result = runner.invoke(bench_app, ["accuracy", "--engines", str(engines), "--pairs", str(bad),
                                       "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "pair 001_missing_to_fixed:" in result.output
    assert not (tmp_path / "x").exists()
