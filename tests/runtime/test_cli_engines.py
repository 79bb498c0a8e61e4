"""``iirp-run --engines``: a tampered, incomplete or mismatched engine folder is one clear error, exit 2,
checked before anything runs, and nothing is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from support import tiny_export

pytest.importorskip("torch")  # to export the tiny checkpoint
pytest.importorskip("onnxruntime")
from typer.testing import CliRunner  # noqa: E402

from iirp.cli import run_app  # noqa: E402
from iirp.manifest import MANIFEST_NAME, Manifest, ManifestMismatchError, sha256_file  # noqa: E402

PREFIX = "iirp-run: error: "


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    return tiny_export(tmp_path_factory.mktemp("cli_engines"))


@pytest.fixture()
def engines(exported: tuple[dict, Path], tmp_path: Path) -> Path:
    """A private copy of the exported folder, free to tamper with."""
    return Path(shutil.copytree(exported[1], tmp_path / "engines"))


def _run_error(data: dict, engines: Path, tmp_path: Path, *extra: str) -> str:
    out = tmp_path / "out"
    args = [str(data["fixed"]), str(data["moving"]), "--engines", str(engines), "-o", str(out), *extra]
    result = CliRunner().invoke(run_app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(PREFIX), result.stderr
    assert not out.exists()
    return lines[0]


def _edit_manifest(engines: Path, edit) -> None:  # type: ignore[no-untyped-def]
    raw = json.loads((engines / MANIFEST_NAME).read_text())
    edit(raw)
    (engines / MANIFEST_NAME).write_text(json.dumps(raw))


def test_untouched_folder_runs(exported: tuple[dict, Path], tmp_path: Path) -> None:
    data, engines = exported
    out = tmp_path / "out"
    result = CliRunner().invoke(
        run_app, [str(data["fixed"]), str(data["moving"]), "--engines", str(engines), "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(result.stdout)["engine"] == "ort"


def test_edited_onnx_file(exported: tuple[dict, Path], engines: Path, tmp_path: Path) -> None:
    path = engines / "flow_estimator_2.onnx"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte inside the weights
    path.write_bytes(bytes(blob))
    line = _run_error(exported[0], engines, tmp_path)
    assert "flow_estimator_2.onnx" in line and "does not match the manifest's sha256" in line


def test_missing_stage_file(exported: tuple[dict, Path], engines: Path, tmp_path: Path) -> None:
    (engines / "flow_estimator_4.onnx").unlink()
    line = _run_error(exported[0], engines, tmp_path)
    assert "flow_estimator_4.onnx (stage flow_estimator_4) is missing" in line


def test_manifest_not_json(exported: tuple[dict, Path], engines: Path, tmp_path: Path) -> None:
    (engines / MANIFEST_NAME).write_text('{"format": "iirp-engines", ')
    assert "is not valid JSON" in _run_error(exported[0], engines, tmp_path)


def test_manifest_grid_edited_for_a_static_export(exported: tuple[dict, Path], engines: Path, tmp_path: Path) -> None:
    def edit(raw: dict) -> None:
        raw["model_grid"]["size"] = [32, 32, 40]

    _edit_manifest(engines, edit)
    line = _run_error(exported[0], engines, tmp_path)
    assert "model_grid size [32, 32, 40] differs from the static shape" in line


def test_stage_file_swapped_with_its_hash_updated(exported: tuple[dict, Path], engines: Path, tmp_path: Path) -> None:
    """A consistent-looking folder whose file has another interface (level 3 weights as level 4)."""
    shutil.copyfile(engines / "flow_estimator_3.onnx", engines / "flow_estimator_4.onnx")

    def edit(raw: dict) -> None:
        raw["stages"]["flow_estimator_4"]["sha256"] = sha256_file(engines / "flow_estimator_4.onnx")

    _edit_manifest(engines, edit)
    line = _run_error(exported[0], engines, tmp_path)
    assert "flow_estimator_4.onnx: input 'moving_features'" in line and "the manifest says" in line


def test_static_engine_refuses_another_shape(exported: tuple[dict, Path]) -> None:
    """Through the library: a model-grid pair of another shape never reaches the sessions."""
    from iirp.iterstop import parse_iterstop
    from iirp.runtime.pipeline import EngineSolver

    solver = EngineSolver(exported[1], "ort")
    size = Manifest.load(exported[1]).size
    wrong = np.zeros((size[0] + 8, size[1], size[2]), dtype=np.float32)
    with pytest.raises(ManifestMismatchError, match=r"exported for a static shape .* re-export with --shape or --dynamic"):
        solver.solve(wrong, wrong, parse_iterstop("rpnet"))


def test_tensorrt_engines_for_another_gpu_or_version() -> None:
    """The TensorRT record is compared before an engine is deserialised (the check itself runs here)."""
    from iirp.runtime.engines.trt import check_built_for

    built = {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt_version": "10.13.0"}
    check_built_for("E", built, {"gpu_name": "NVIDIA H100 PCIe", "compute_capability": "9.0"}, "10.13.0")
    with pytest.raises(ManifestMismatchError, match=r"built for NVIDIA H100 80GB HBM3 \(sm 9.0, TensorRT 10.13.0\)"):
        check_built_for("E", built, {"gpu_name": "NVIDIA A100", "compute_capability": "8.0"}, "10.13.0")
    with pytest.raises(ManifestMismatchError, match=r"TensorRT 11.0.0\): re-export with --trt"):
        check_built_for("E", built, {"gpu_name": "NVIDIA H100 PCIe", "compute_capability": "9.0"}, "11.0.0")


def test_trt_engine_requested_from_an_onnx_only_folder(exported: tuple[dict, Path], tmp_path: Path) -> None:
    line = _run_error(exported[0], exported[1], tmp_path, "--engine", "trt")
    assert "TensorRT" in line


def test_defaults_name_the_engine_and_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from iirp.runtime.solvers import default_device, default_engine, fastest_cpu_engine

    assert default_engine("m.pt", None) == "reference" and default_engine(None, "engines") == "ort"
    assert default_device("trt") == "cuda" and default_device("openvino") == "cpu"
    assert fastest_cpu_engine() == "openvino"  # a normal dependency
    real_import = builtins.__import__

    def without_openvino(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("no openvino here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_openvino)
    assert fastest_cpu_engine() == "ort"


def test_progress_steps_leave_the_registration_unchanged(exported: tuple[dict, Path], tmp_path: Path) -> None:
    """``on_step`` (iirp-run's progress line) names each step in order, builds the stages as a step of its own
    with the load time still reported, and changes no output."""
    from iirp.runtime.register import register_files
    from iirp.runtime.solvers import make_solver

    data, engines = exported
    steps: list[str] = []
    with_steps = register_files(data["fixed"], data["moving"], make_solver("ort", engines=engines),
                                tmp_path / "a", on_step=steps.append)
    without = register_files(data["fixed"], data["moving"], make_solver("ort", engines=engines), tmp_path / "b")
    assert [s.split(" (")[0] for s in steps] == [
        "resampling onto the model grid", "loading the models", "registering", "warping the moving image",
        "writing the outputs"]
    assert with_steps["timings_ms"]["load"] >= 0 and "load" in without["timings_ms"]
    assert with_steps["iterations"] == without["iterations"] and with_steps["scores"] == without["scores"]
    for name in ("warped.nii.gz", "displacement.nii.gz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
