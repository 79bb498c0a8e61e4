"""``iirp-run`` success path on a tiny pair with a tiny random-weight checkpoint.

Each CLI run costs a few seconds of CPU, so the runs are module-scoped fixtures
shared by the tests that inspect their outputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from support import stale_partial, tiny_inputs

sitk = pytest.importorskip("SimpleITK")
torch = pytest.importorskip("torch")
from typer.testing import CliRunner  # noqa: E402

import iirp  # noqa: E402
from iirp.cli import run_app  # noqa: E402
from iirp.iterstop import DEFAULT_DELTA, parse_iterstop  # noqa: E402

SIZE = (32, 32, 32)  # (x, y, z); tiny so inference stays cheap
LABELS = (0, 3, 7, 12)
REPORT_KEYS = {
    "iterations", "estimator_passes", "scores", "timings_ms", "engine", "device", "iterstop", "delta",
    "folding_fraction", "model_grid", "inputs", "iirp_version",
}
#: warped.nii.gz vs resampling through the float32 field on disk, relative to the intensity range
FIELD_ROUNDING_RTOL = 1e-3
#: CLI output vs the library's own model-grid warp, relative to the intensity range
MODEL_WARP_RTOL = 1e-3


def _invoke(args: list[object]):  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(run_app, [str(a) for a in args])
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output!r}; exc={result.exception!r}"
    return result


@pytest.fixture(scope="module")
def rpnet_run(data: dict, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("rpnet_run") / "out"
    result = _invoke([
        data["fixed"], data["moving"], "--checkpoint", data["ckpt"], "-o", out,
        "--iterstop", "rpnet", "--moving-seg", data["seg"], "--json",
    ])
    return out, result


@pytest.fixture(scope="module")
def official_run(data: dict, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("official_run") / "out"
    out.mkdir()  # an existing empty folder, holding only what a killed run left behind
    stale_partial(out)
    result = _invoke([data["fixed"], data["moving"], "--checkpoint", data["ckpt"], "-o", out, "--iterstop", "official"])
    return out, result


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _same_grid(a: "sitk.Image", b: "sitk.Image") -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


# --------------------------------------------------------------------------- folder contents


def test_rpnet_outputs(rpnet_run) -> None:  # type: ignore[no-untyped-def]
    out, _ = rpnet_run
    assert sorted(os.listdir(out)) == ["displacement.nii.gz", "report.json", "warped.nii.gz", "warped_seg.nii.gz"]


def test_official_outputs_in_existing_folder(official_run) -> None:  # type: ignore[no-untyped-def]
    out, _ = official_run
    # no --moving-seg: no warped_seg; the killed run's partial folder is swept; no staging folder left
    assert sorted(os.listdir(out)) == ["displacement.nii.gz", "report.json", "warped.nii.gz"]


@pytest.mark.parametrize("run", ["rpnet_run", "official_run"])
def test_no_partial_folder_left(run: str, request: pytest.FixtureRequest) -> None:
    out, _ = request.getfixturevalue(run)
    assert not [p for p in os.listdir(out) if p.startswith(".iirp-partial-")]
    assert not [p for p in os.listdir(out.parent) if p.startswith(".iirp-partial-")]


# --------------------------------------------------------------------------- report


def _check_report(report: dict, data: dict, iterstop: str) -> None:
    assert REPORT_KEYS <= report.keys(), REPORT_KEYS - report.keys()
    assert report["iirp_version"] == iirp.__version__
    assert report["engine"] == "reference"
    assert report["device"] == "cpu"
    assert report["iterstop"] == iterstop
    assert report["delta"] == DEFAULT_DELTA
    iterations = report["iterations"]
    assert len(iterations) == 4 and all(isinstance(n, int) and n >= 0 for n in iterations)
    assert isinstance(report["estimator_passes"], int)
    assert report["estimator_passes"] >= sum(iterations)
    scores = report["scores"]
    assert len(scores) == 4 and all(isinstance(s, list) for s in scores)
    assert all(-1.0 - 1e-9 <= v <= 1.0 + 1e-9 for s in scores for v in s)
    timings = report["timings_ms"]
    assert "total" in timings
    assert all(isinstance(v, float) and v >= 0 for v in timings.values())
    assert timings["total"] >= max(v for k, v in timings.items() if k != "total")
    assert 0.0 <= report["folding_fraction"] <= 1.0
    grid = report["model_grid"]
    assert grid["size"] == list(SIZE)
    assert grid["spacing"] == [1.0, 1.0, 1.0]
    assert grid["voxel_for_voxel"] is True  # the fixed image already has the model's size and spacing
    assert report["inputs"]["fixed"] == str(data["fixed"])
    assert report["inputs"]["moving"] == str(data["moving"])


def test_rpnet_report(rpnet_run, data: dict) -> None:  # type: ignore[no-untyped-def]
    out, _ = rpnet_run
    report = _report(out)
    _check_report(report, data, "rpnet")
    assert report["iterations"] == [1, 1, 1, 1]
    assert report["estimator_passes"] == 4
    assert report["scores"] == [[], [], [], []]  # a fixed rule computes no score
    assert report["inputs"]["moving_seg"] == str(data["seg"])
    assert report["outputs"]["warped_seg"] == str(out / "warped_seg.nii.gz")
    for path in report["outputs"].values():
        assert Path(path).is_file(), path


def test_official_report(official_run, data: dict) -> None:  # type: ignore[no-untyped-def]
    out, _ = official_run
    report = _report(out)
    _check_report(report, data, "official")
    assert report["iterations"][0] >= 1  # level 4 always keeps at least one pass
    assert all(len(s) >= 1 for s in report["scores"])  # every level scores at least once
    assert report["inputs"]["moving_seg"] is None
    assert "warped_seg" not in report["outputs"]


def test_json_flag_prints_the_report(rpnet_run) -> None:  # type: ignore[no-untyped-def]
    out, result = rpnet_run
    printed = json.loads(result.stdout)
    assert printed == _report(out)


def test_human_summary(official_run) -> None:  # type: ignore[no-untyped-def]
    out, result = official_run
    text = result.stdout
    assert "iterations (levels 4..1):" in text
    assert "folding fraction:" in text
    assert str(out / "warped.nii.gz") in text
    try:
        assert result.stderr == ""
    except ValueError:  # older click: stderr mixed into output
        pass


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("run", ["rpnet_run", "official_run"])
def test_warped_and_displacement_on_fixed_grid(run: str, data: dict, request: pytest.FixtureRequest) -> None:
    out, _ = request.getfixturevalue(run)
    fixed = sitk.ReadImage(str(data["fixed"]))
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    field = sitk.ReadImage(str(out / "displacement.nii.gz"))
    assert warped.GetPixelID() == sitk.sitkFloat32
    assert warped.GetDimension() == 3
    _same_grid(warped, fixed)
    assert field.GetPixelID() == sitk.sitkVectorFloat32
    assert field.GetNumberOfComponentsPerPixel() == 3
    assert field.GetDimension() == 3
    _same_grid(field, fixed)
    assert np.isfinite(sitk.GetArrayViewFromImage(field)).all()
    assert np.isfinite(sitk.GetArrayViewFromImage(warped)).all()


@pytest.mark.parametrize("run", ["rpnet_run", "official_run"])
def test_field_reproduces_warped(run: str, data: dict, request: pytest.FixtureRequest) -> None:
    out, _ = request.getfixturevalue(run)
    fixed = sitk.ReadImage(str(data["fixed"]))
    moving = sitk.ReadImage(str(data["moving"]))
    field = sitk.ReadImage(str(out / "displacement.nii.gz"))
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    again = sitk.GetArrayFromImage(
        sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    )
    values = sitk.GetArrayViewFromImage(moving)
    value_range = float(values.max() - values.min())
    assert np.abs(again - warped).max() < FIELD_ROUNDING_RTOL * value_range


def test_field_is_not_trivial(rpnet_run) -> None:  # type: ignore[no-untyped-def]
    """The random network moves voxels, so the geometry tests below have teeth."""
    out, _ = rpnet_run
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz")))
    assert np.abs(field).max() > 0.05


def test_warped_matches_model_grid_warp(rpnet_run, data: dict) -> None:  # type: ignore[no-untyped-def]
    """End to end geometry: the CLI's warped image, brought to the model orientation, equals
    the library's own model-grid warp of the normalised moving image by the solver's flow
    (interior voxels whose sample point keeps all 8 neighbours inside the volume)."""
    from iirp.model.spatial import warp
    from iirp.runtime import RegistrationOptions, make_solver, prepare_pair
    from iirp.runtime.geometry import array_from_image, orient
    from iirp.runtime.imageio import read_image

    out, _ = rpnet_run
    fixed = read_image(data["fixed"], "fixed")
    moving = read_image(data["moving"], "moving")
    solver = make_solver("reference", checkpoint=data["ckpt"], device="cpu")
    pair = prepare_pair(fixed, moving, solver.model_size, RegistrationOptions(iterstop="rpnet"))
    assert pair.voxel_for_voxel
    flow = solver.solve(pair.moving, pair.fixed, parse_iterstop("rpnet")).flow
    assert flow.shape == (3, *SIZE) and flow.dtype == np.float32
    with torch.inference_mode():
        model_warped = warp(torch.from_numpy(pair.moving)[None, None], torch.from_numpy(flow)[None])[0, 0].numpy()

    values = sitk.GetArrayViewFromImage(moving)
    low, high = float(values.min()), float(values.max())
    expected = model_warped * (high - low) + low  # back from [0, 1] to the moving image's intensities
    cli = array_from_image(orient(sitk.ReadImage(str(out / "warped.nii.gz"))))

    index = np.stack(np.meshgrid(*[np.arange(n) for n in SIZE], indexing="ij"))
    target = index + flow
    inside = np.all((target >= 0) & (target <= np.asarray(SIZE).reshape(3, 1, 1, 1) - 1), axis=0)
    assert inside.mean() > 0.5
    np.testing.assert_array_less(np.abs(cli - expected)[inside], MODEL_WARP_RTOL * (high - low))


def test_warped_seg(rpnet_run, data: dict) -> None:  # type: ignore[no-untyped-def]
    out, _ = rpnet_run
    fixed = sitk.ReadImage(str(data["fixed"]))
    seg = sitk.ReadImage(str(out / "warped_seg.nii.gz"))
    assert seg.GetPixelID() == sitk.sitkInt16
    _same_grid(seg, fixed)
    found = set(np.unique(sitk.GetArrayViewFromImage(seg)).tolist())
    assert found <= set(LABELS)
    assert len(found - {0}) >= 2  # small displacements keep most labels


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Valid inputs: a fixed/moving pair, an int16 label map and a tiny random-weight checkpoint."""
    return tiny_inputs(tmp_path_factory.mktemp("cli_inputs"))
