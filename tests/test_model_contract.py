"""The model contract: grid size, spacing, orientation and intensity rule, from checkpoint to report.

A checkpoint records its grid (``iirp-train`` writes it) or the export is told (``--spacing``); the
manifest carries it; ``iirp-run`` builds the model grid from it with no run-time option, and an
option that contradicts it is one clear error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import tiny_inputs

torch = pytest.importorskip("torch")
sitk = pytest.importorskip("SimpleITK")
from typer.testing import CliRunner  # noqa: E402

from iirp.cli import export_app, run_app  # noqa: E402
from iirp.demo.run import DEMO_SPACING, demo_file, make_demo_pair  # noqa: E402
from iirp.export import ExportOptionError, export_checkpoint  # noqa: E402
from iirp.manifest import ContractError, Manifest, ModelContract  # noqa: E402


def _one_error(result, prog: str) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The demo checkpoint exported with --spacing 2.5 through the CLI, and the demo pair."""
    root = tmp_path_factory.mktemp("contract")
    pair = make_demo_pair(root / "pair")["paths"]
    engines = root / "engines"
    with demo_file("demo_rpnet.pt") as checkpoint:
        result = CliRunner().invoke(export_app, [str(checkpoint), "-o", str(engines), "--spacing", "2.5",
                                                 "--no-verify"])
    assert result.exit_code == 0, (result.output, result.exception)
    return {"pair": pair, "engines": engines, "root": root}


def test_export_records_the_grid(demo: dict) -> None:
    manifest = Manifest.load(demo["engines"])
    assert manifest.model_grid["spacing"] == [2.5, 2.5, 2.5] and manifest.model_grid["orientation"] == "RAS"
    assert manifest.contract == ModelContract((64, 80, 64), (2.5, 2.5, 2.5), "RAS", "minmax", True)


def test_run_uses_the_recorded_grid_without_any_option(demo: dict) -> None:
    out = demo["root"] / "run"
    result = CliRunner().invoke(run_app, [str(demo["pair"]["fixed"]), str(demo["pair"]["moving"]),
                                          "--engines", str(demo["engines"]), "-o", str(out), "--iterstop", "rpnet"])
    assert result.exit_code == 0, (result.output, result.exception)
    grid = json.loads((out / "report.json").read_text())["model_grid"]
    assert grid["spacing"] == [DEMO_SPACING] * 3 and grid["size"] == [64, 80, 64]
    assert grid["voxel_for_voxel"] is True  # the demo images are on the 2.5 mm grid: used as they are


@pytest.mark.parametrize("spacing", ["1", "2"])
def test_a_contradicting_spacing_is_one_error(demo: dict, tmp_path: Path, spacing: str) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(run_app, [str(demo["pair"]["fixed"]), str(demo["pair"]["moving"]),
                                          "--engines", str(demo["engines"]), "-o", str(out), "--spacing", spacing])
    line = _one_error(result, "iirp-run")
    assert f"--spacing {spacing} mm contradicts the model, which was trained on a 2.5 mm grid" in line
    assert not out.exists()


def test_the_same_spacing_is_accepted(demo: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(run_app, [str(demo["pair"]["fixed"]), str(demo["pair"]["moving"]),
                                          "--engines", str(demo["engines"]), "-o", str(out), "--spacing", "2.5",
                                          "--iterstop", "rpnet"])
    assert result.exit_code == 0, result.stderr


def test_a_trained_checkpoint_keeps_its_grid_end_to_end(tmp_path: Path) -> None:
    """iirp-train --spacing 2.5 records 2.5 mm; export and the reference run take it without being told."""
    from iirp.model import RPNet
    from iirp.model.training import save_released

    data = tiny_inputs(tmp_path)
    net = RPNet(size=(32, 32, 32))
    net.load_state_dict(data["state"])
    checkpoint = save_released(net, (32, 32, 32), tmp_path / "trained.pt",
                               record={"spacing": [2.5] * 3, "orientation": "RAS", "intensity": "minmax"})
    manifest = export_checkpoint(checkpoint, tmp_path / "engines", verify=False, progress=False,
                                 exporter="torchscript")
    assert manifest.contract.spacing == (2.5, 2.5, 2.5)
    with pytest.raises(ExportOptionError, match=r"--spacing 1 1 1 contradicts checkpoint .* records a 2.5 x 2.5 x 2.5"):
        export_checkpoint(checkpoint, tmp_path / "other", spacing=1.0, verify=False, progress=False,
                          exporter="torchscript")
    with pytest.raises(ExportOptionError, match=r"--intensity window:0,1 contradicts checkpoint .* trained with minmax"):
        export_checkpoint(checkpoint, tmp_path / "other", intensity="window:0,1", verify=False, progress=False,
                          exporter="torchscript")
    assert not (tmp_path / "other").exists()
    out = tmp_path / "run"
    result = CliRunner().invoke(run_app, [str(data["fixed"]), str(data["moving"]), "--checkpoint", str(checkpoint),
                                          "-o", str(out), "--iterstop", "rpnet"])
    assert result.exit_code == 0, result.stderr
    grid = json.loads((out / "report.json").read_text())["model_grid"]
    assert grid["spacing"] == [2.5, 2.5, 2.5] and grid["voxel_for_voxel"] is False  # 1 mm images, resampled


def test_contract_with_spacing() -> None:
    recorded = ModelContract((32, 32, 32), (2.5, 2.5, 2.5))
    assert recorded.with_spacing(None) is recorded and recorded.with_spacing((2.5,) * 3) == recorded
    with pytest.raises(ContractError, match=r"--spacing 1 mm contradicts the model"):
        recorded.with_spacing((1.0,) * 3)
    unrecorded = ModelContract((32, 32, 32), recorded=False)
    assert unrecorded.with_spacing((0.8, 0.8, 1.5)).spacing == (0.8, 0.8, 1.5)
    with pytest.raises(ContractError, match=r"must be 3 positive numbers"):
        unrecorded.with_spacing((0.0, 1.0, 1.0))
