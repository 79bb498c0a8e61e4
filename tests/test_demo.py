"""The built-in example (iirp.demo): packaged data, and run_demo end to end on it."""

from __future__ import annotations

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


def test_run_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's main command: exports the demo checkpoint (cached), registers with onnxruntime, scores."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("IIRP_CACHE_DIR", str(tmp_path / "cache"))
    pytest.importorskip("torch")  # the first run exports the checkpoint
    from iirp.demo import run_demo

    result = run_demo(tmp_path / "out", progress=False)
    assert result["epe_after"]["mm"] < result["epe_before"]["mm"], result
    assert result["dice_after"]["mean"] > result["dice_before"]["mean"], result
    assert len(result["iterations"]) == 4
    assert {"warped", "displacement", "warped_seg", "report"} <= set(result["outputs"])
    assert Path(result["engines"]).is_relative_to(tmp_path / "cache")
