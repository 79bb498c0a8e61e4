"""The built-in example (iirp.demo): packaged data, and run_demo end to end on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from iirp.demo import DEMO_SHAPE, DEMO_SPACING, demo_file, make_demo_pair
from iirp.runtime.geometry import array_from_image


def test_packaged_data_is_on_the_demo_grid() -> None:
    with demo_file("icbm152_t1.nii.gz") as t1_path, demo_file("icbm152_tissue.nii.gz") as seg_path:
        t1, seg = sitk.ReadImage(str(t1_path)), sitk.ReadImage(str(seg_path))
    for image in (t1, seg):
        assert image.GetSize() == DEMO_SHAPE and image.GetSpacing() == (DEMO_SPACING,) * 3
        assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection()) == "RAS"
    assert set(np.unique(array_from_image(seg, dtype=np.uint8))) == {0, 1, 2}
    with demo_file("LICENSE-ICBM152.txt") as notice, demo_file("demo_rpnet.pt") as ckpt:
        assert "Copyright (C) 1993-2009 Louis Collins" in notice.read_text()
        assert ckpt.stat().st_size < 3_000_000


def test_demo_pair_matches_its_truth(tmp_path: Path) -> None:
    from iirp.kernels import warp

    made = make_demo_pair(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "fixed.nii.gz", "moving.nii.gz", "fixed_seg.nii.gz", "moving_seg.nii.gz", "true_displacement.nii.gz"}
    fixed = array_from_image(sitk.ReadImage(str(made["paths"]["fixed"])))
    moving = array_from_image(sitk.ReadImage(str(made["paths"]["moving"])))
    ncc = lambda a, b: float(np.corrcoef(a.ravel(), b.ravel())[0, 1])  # noqa: E731
    assert ncc(warp(moving, made["flow"]), fixed) > ncc(moving, fixed)


@pytest.fixture(scope="module")
def demo_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``iirp-run --demo --json`` once: exports the demo checkpoint (cached), registers with onnxruntime, scores."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")  # the first run exports the checkpoint
    from typer.testing import CliRunner

    from iirp.cli import run_app

    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IIRP_CACHE_DIR", str(root / "cache"))
        res = CliRunner().invoke(run_app, ["--demo", "-o", str(root / "out"), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    result["_cache"] = str(root / "cache")
    return result


def test_run_demo_through_the_cli(demo_result: dict) -> None:
    """The README's main command runs end to end and writes every output, the QC picture included."""
    from iirp.cli import demo_summary

    assert len(demo_result["iterations"]) == 4
    assert {"warped", "displacement", "warped_seg", "qc", "report"} <= set(demo_result["outputs"])
    assert all(Path(p).is_file() for p in demo_result["outputs"].values())
    assert Path(demo_result["engines"]).is_relative_to(demo_result["_cache"])
    assert demo_result["epe_before"]["voxels"] == pytest.approx(1.128, abs=0.01)  # the fixed-seed demo pair
    lines = demo_summary(demo_result)
    assert any(line.startswith("end-point error in the brain:") for line in lines)


def test_demo_checkpoint_undoes_the_known_deformation(demo_result: dict) -> None:
    """The packaged checkpoint registers the demo pair (benchmarks/results/demo_training.md).

    Measured when it was packaged: end-point error 2.82 -> 1.76 mm (0.62x), GM/WM Dice
    0.819/0.791 -> 0.884/0.875. The bounds leave room for float32 differences, not for a
    worse model: at least 30 % less end-point error and +0.05 mean tissue Dice.
    """
    assert demo_result["epe_after"]["mm"] < 0.7 * demo_result["epe_before"]["mm"], demo_result["epe_after"]
    assert demo_result["dice_after"]["mean"] > demo_result["dice_before"]["mean"] + 0.05, demo_result["dice_after"]
    for tissue in ("gm", "wm"):
        assert demo_result["dice_after"][tissue] > demo_result["dice_before"][tissue], tissue


def test_demo_rejects_images(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from iirp.cli import run_app

    res = CliRunner().invoke(run_app, ["--demo", str(tmp_path / "a.nii.gz"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == ["iirp-run: error: --demo takes no images, --pairs, --moving-seg, "
                                               "--checkpoint, --engines, --slabs or --low-memory"]
    assert not (tmp_path / "o").exists()
