"""Engine ``openvino`` on a tiny export: fp32 exactness against onnxruntime and the PyTorch reference (stage by
stage and through the whole IterStop loop), precision selection and its fallback, the per-stage backend choice and
its cache, ``--threads``, option errors (one line, exit 2, nothing written) and the report fields.

bf16 numerics need a CPU with native bf16 (AMX or AVX512-BF16); those tests skip elsewhere with the reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from support import tiny_export

pytest.importorskip("torch")  # to export the tiny checkpoint
pytest.importorskip("openvino")
from typer.testing import CliRunner  # noqa: E402

from iirp.cli import run_app  # noqa: E402
from iirp.export.openvino_gate import BF16_STAGE_TOLERANCE, FLOW_P999_VOXELS, flow_difference  # noqa: E402
from iirp.export.verify import FP32_TOLERANCE, Tolerance, compare  # noqa: E402
from iirp.iterstop import parse_iterstop  # noqa: E402
from iirp.manifest import MANIFEST_NAME, STAGES, Manifest, ManifestMismatchError  # noqa: E402
from iirp.runtime.engines import BackendOptionError, BackendOptions  # noqa: E402
from iirp.runtime.engines import openvino as ovmod  # noqa: E402
from iirp.runtime.engines.openvino import (  # noqa: E402
    OpenVinoBackend,
    OpenVinoPrecisionError,
    cpu_has_native_bf16,
    select_precision,
)
from iirp.runtime.engines.ort import OrtBackend  # noqa: E402
from iirp.runtime.engines.torch_backend import TorchBackend  # noqa: E402
from iirp.runtime.pipeline import EngineSolver  # noqa: E402
from iirp.runtime.solvers import TorchSolver, make_solver  # noqa: E402

PREFIX = "iirp-run: error: "
#: OpenVINO fp32 vs onnxruntime / PyTorch through the whole loop: flows in voxels. Per stage both
#: match PyTorch to 1e-4 (FP32_TOLERANCE); compositions over up to 10 passes per level and the 8x
#: upsampling of the coarse flows can grow that tenfold, never to anything a label boundary feels.
LOOP_FP32_ATOL_VOXELS = 1e-3
ALL_OPENVINO = {stage: "openvino" for stage in STAGES}
NATIVE_BF16 = cpu_has_native_bf16()
needs_bf16 = pytest.mark.skipif(
    not NATIVE_BF16, reason="this CPU has no native bf16 (OpenVINO OPTIMIZATION_CAPABILITIES lacks BF16): "
                            "bf16 numerics cannot be checked here")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    return tiny_export(tmp_path_factory.mktemp("openvino"))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own cache folder (compiled models, stage choices)."""
    monkeypatch.setenv("IIRP_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def pair(exported: tuple[dict, Path]) -> tuple[np.ndarray, np.ndarray]:
    """``(moving, fixed)`` of the tiny blob pair on the model grid."""
    from iirp.runtime.imageio import read_image
    from iirp.runtime.register import RegistrationOptions, prepare_pair

    data, engines = exported
    prepared = prepare_pair(read_image(data["fixed"], "fixed"), read_image(data["moving"], "moving"),
                            Manifest.load(engines).size, RegistrationOptions())
    return prepared.moving, prepared.fixed


def _stage_inputs(manifest: Manifest, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """A random image for the feature extractor and random features for each estimator."""
    rng = np.random.default_rng(seed)
    sizes = dict(zip("XYZ", manifest.size))
    return {stage: {t.name: rng.random(t.resolve(sizes), dtype=np.float32) for t in manifest.stages[stage].inputs}
            for stage in STAGES}


# --------------------------------------------------------------------------- fp32 exactness


def test_fp32_stages_match_ort_and_torch(exported: tuple[dict, Path]) -> None:
    folder = exported[1]
    manifest = Manifest.load(folder)
    inputs = _stage_inputs(manifest)
    for stage in STAGES:
        backends = [cls(stage, manifest, folder, "cpu", BackendOptions(precision="fp32"))
                    for cls in (OpenVinoBackend, OrtBackend, TorchBackend)]
        outs = []
        for backend in backends:
            with backend:
                outs.append(backend.infer(inputs[stage]))
        assert backends[0].runs_on == "openvino-fp32" and backends[1].runs_on == "ort-fp32"
        ov_out, ort_out, torch_out = outs
        for name, value in ov_out.items():
            assert value.dtype == np.float32 and value.shape == torch_out[name].shape
            for ref_name, ref in (("ort", ort_out[name]), ("torch", torch_out[name])):
                check = compare(stage, name, "random", ref_name, value, ref, FP32_TOLERANCE)
                assert check.passed, check


def test_outputs_are_never_overwritten_while_referenced(exported: tuple[dict, Path]) -> None:
    """The contract: no later call overwrites the outputs (or views of them) a caller still holds; OpenVINO's
    output memory is returned without a copy, so a request is reused only once its outputs are gone."""
    import gc

    folder = exported[1]
    manifest = Manifest.load(folder)
    a, b = _stage_inputs(manifest, 1), _stage_inputs(manifest, 2)
    with OpenVinoBackend("feature_extractor", manifest, folder, "cpu", BackendOptions(precision="fp32")) as backend:
        first = backend.infer(a["feature_extractor"])
        moving_f1 = np.ascontiguousarray(first["f1"][1])  # a view, as the pipeline keeps them
        kept = {k: v.copy() for k, v in first.items()}
        second = backend.infer(b["feature_extractor"])
        assert len(backend.requests) == 2
        for name, value in first.items():
            np.testing.assert_array_equal(value, kept[name])
        del first, second
        gc.collect()
        backend.infer(a["feature_extractor"])  # the second call's request is free again: no third one
        assert len(backend.requests) == 2
        np.testing.assert_array_equal(moving_f1, kept["f1"][1])
        del moving_f1
        gc.collect()
        out = backend.infer(b["feature_extractor"])
        assert len(backend.requests) == 2 and out["f1"].dtype == np.float32 and out["f1"].flags.c_contiguous


def test_trim_frees_working_memory_but_keeps_held_outputs(exported: tuple[dict, Path]) -> None:
    """``trim`` (after each level and each registration) drops the requests no output of which is held, and
    OpenVINO's intermediate buffers; outputs still held stay intact and keep their request; results are
    unchanged by it."""
    import gc

    folder = exported[1]
    manifest = Manifest.load(folder)
    a, b = _stage_inputs(manifest, 3), _stage_inputs(manifest, 4)
    with OpenVinoBackend("feature_extractor", manifest, folder, "cpu", BackendOptions(precision="fp32")) as backend:
        held = backend.infer(a["feature_extractor"])
        kept = {k: v.copy() for k, v in held.items()}
        dropped = backend.infer(b["feature_extractor"])
        del dropped
        gc.collect()
        backend.trim()
        assert len(backend.requests) == 1  # the held outputs' request
        filler = [np.full(v.shape, 7.0, np.float32) for v in kept.values()]  # reuse any memory freed
        again = backend.infer(b["feature_extractor"])  # a new request: the held one is busy
        assert len(backend.requests) == 2
        for name, value in held.items():
            np.testing.assert_array_equal(value, kept[name])
        fresh = backend.infer(a["feature_extractor"])  # after trim: same results as before it
        for name, value in fresh.items():
            np.testing.assert_array_equal(value, kept[name])
        del held, again, fresh, filler, value
        gc.collect()
        backend.trim()
        assert backend.requests == []


@pytest.mark.parametrize("rule", ["official", "fixed:2,1,2,3"])
def test_fp32_loop_matches_ort_and_torch(exported: tuple[dict, Path], pair, rule: str) -> None:
    data, folder = exported
    moving, fixed = pair
    iterstop = parse_iterstop(rule)
    ov = EngineSolver(folder, "openvino", options=BackendOptions(precision="fp32", stages=ALL_OPENVINO))
    traces = {"openvino": ov.solve(moving, fixed, iterstop),
              "ort": EngineSolver(folder, "ort").solve(moving, fixed, iterstop),
              "torch": TorchSolver(data["ckpt"]).solve(moving, fixed, iterstop)}
    assert ov.backend_report["stage_backends"] == {s: "openvino-fp32" for s in STAGES}
    reference = traces.pop("openvino")
    for name, trace in traces.items():
        assert reference.iterations == trace.iterations, name
        assert reference.flow.shape == trace.flow.shape and reference.flow.dtype == np.float32
        assert float(np.abs(reference.flow - trace.flow).max()) <= LOOP_FP32_ATOL_VOXELS, name


# --------------------------------------------------------------------------- precision selection


def test_select_precision_rules() -> None:
    passed, failed = {"status": "passed"}, {"status": "failed", "reason": "iterations differ"}
    not_run = {"status": "not_run", "reason": "no native bf16"}
    assert select_precision("fp32", bf16_native=True, gate=passed) == ovmod.PrecisionChoice("fp32")
    assert select_precision("auto", bf16_native=True, gate=passed).precision == "bf16"
    for gate, needle in ((None, "no bf16 accuracy record"), (failed, "failed (iterations differ)"),
                         (not_run, "was not run (no native bf16)")):
        choice = select_precision("auto", bf16_native=True, gate=gate)
        assert choice.precision == "fp32" and needle in str(choice.note)
    choice = select_precision("auto", bf16_native=False, gate=passed)
    assert choice.precision == "fp32" and "no native bf16" in str(choice.note)
    assert select_precision("bf16", bf16_native=True, gate=passed) == ovmod.PrecisionChoice("bf16")
    assert "failed" in str(select_precision("bf16", bf16_native=True, gate=failed).note)
    with pytest.raises(OpenVinoPrecisionError, match=r"--precision bf16 needs a CPU that computes bf16 natively"):
        select_precision("bf16", bf16_native=False, gate=passed)
    with pytest.raises(OpenVinoPrecisionError, match=r"engine 'openvino' computes fp32 or bf16, not fp16"):
        select_precision("fp16", bf16_native=True, gate=None)
    with pytest.raises(BackendOptionError, match=r"'precision' \(--precision\) must be one of auto, fp32, bf16, fp16"):
        select_precision("fp64", bf16_native=True, gate=None)


def _run(data: dict, engines: Path, out: Path, *extra: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(run_app, [str(data["fixed"]), str(data["moving"]), "--engines", str(engines),
                                        "-o", str(out), *extra])


def test_auto_falls_back_to_fp32_without_native_bf16(exported, tmp_path: Path, monkeypatch) -> None:
    """Capability detection forced off: auto runs fp32 and says so in one line of the report and the summary."""
    monkeypatch.setattr(ovmod, "cpu_has_native_bf16", lambda: False)
    data, engines = exported
    result = _run(data, engines, tmp_path / "out", "--engine", "openvino", "--threads", "1")
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["engine"] == "openvino" and report["precision"] == "fp32" and report["threads"] == 1
    assert "auto chose fp32: this CPU has no native bf16" in report["precision_note"]
    assert set(report["stage_backends"]) == set(STAGES)
    assert all(v in ("openvino-fp32", "ort-fp32") for v in report["stage_backends"].values())
    assert report["load_ms"] > 0 and report["timings_ms"]["load"] == report["load_ms"]
    choice = report["openvino"]["stage_choice"]
    assert {c["how"] for c in choice.values()} == {"measured"} and all(set(c["min_ms"]) == {"openvino", "ort"}
                                                                       for c in choice.values())
    assert report["openvino"]["cache_dir"] == str(tmp_path / "cache" / "openvino")
    line = next(ln for ln in result.output.splitlines() if ln.startswith("engine openvino"))
    assert "precision fp32 (auto chose fp32" in line and "for feature_extractor" in line and "estimator 1" in line


def test_auto_without_a_gate_record_stays_fp32_on_a_bf16_cpu(exported, monkeypatch) -> None:
    monkeypatch.setattr(ovmod, "cpu_has_native_bf16", lambda: True)
    solver = make_solver("openvino", engines=exported[1])
    assert solver.precision == "fp32" and "no bf16 accuracy record" in solver.precision_note  # type: ignore[attr-defined]


@pytest.mark.skipif(NATIVE_BF16, reason="checks the guard against a bf16 hint that silently compiles f32")
def test_bf16_that_compiles_f32_is_refused(exported, tmp_path: Path, monkeypatch) -> None:
    """Detection forced on, gate passed: auto picks bf16, OpenVINO compiles f32 here, and that is one clear error."""
    monkeypatch.setattr(ovmod, "cpu_has_native_bf16", lambda: True)
    data, engines = exported
    folder = Path(shutil.copytree(engines, tmp_path / "engines"))
    raw = json.loads((folder / MANIFEST_NAME).read_text())
    raw["openvino"] = {"bf16_gate": {"status": "passed"}}
    (folder / MANIFEST_NAME).write_text(json.dumps(raw))
    line = _one_line_error(_run(data, folder, tmp_path / "out", "--engine", "openvino"), tmp_path / "out")
    assert "with inference precision f32, not the asked bf16" in line


# --------------------------------------------------------------------------- options, errors


def _one_line_error(result, out: Path) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(PREFIX), result.stderr
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize(("extra", "needle"), [
    (["--threads", "0"], "'threads' (--threads) must be an integer >= 1, got 0"),
    (["--threads", "-2", "--engine", "openvino"], "must be an integer >= 1, got -2"),
    (["--precision", "fp64"], "'precision' (--precision) must be one of auto, fp32, bf16, fp16, got 'fp64'"),
    (["--precision", "bf16"], "--precision bf16 needs --engine openvino, got engine 'ort'"),
    (["--engine", "openvino", "--precision", "bf16"], "--precision bf16 needs a CPU that computes bf16 natively"),
    (["--engine", "openvino", "--device", "cuda"], "engine 'openvino' runs on the CPU"),
    (["--engine", "ort", "--precision", "bf16"], "--precision bf16 needs --engine openvino"),
])
def test_option_errors(exported, tmp_path: Path, monkeypatch, extra: list[str], needle: str) -> None:
    monkeypatch.setattr(ovmod, "cpu_has_native_bf16", lambda: False)
    data, engines = exported
    assert needle in _one_line_error(_run(data, engines, tmp_path / "out", *extra), tmp_path / "out")


def test_threads_are_checked_before_anything_loads(exported, tmp_path: Path) -> None:
    data, _ = exported
    line = _one_line_error(_run(data, tmp_path / "no-such-folder", tmp_path / "out", "--threads", "0"),
                           tmp_path / "out")
    assert "--threads" in line and "no-such-folder" not in line


def test_fp16_export_is_refused(exported, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(exported[1], tmp_path / "engines"))
    raw = json.loads((folder / MANIFEST_NAME).read_text())
    raw["precision"] = "fp16"
    (folder / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ManifestMismatchError, match=r"engine 'openvino' reads fp32 exports .* re-export"):
        make_solver("openvino", engines=folder)


def test_threads_reach_every_library(exported, pair) -> None:
    import numba
    import torch

    folder = exported[1]
    before = torch.get_num_threads()
    try:
        solver = EngineSolver(folder, "openvino", options=BackendOptions(
            threads=1, stages={"feature_extractor": "ort", **{s: "openvino" for s in STAGES[1:]}}))
        solver.solve(*pair, parse_iterstop("rpnet"))
        assert numba.get_num_threads() == 1
        fe = solver.stages["feature_extractor"].inner  # type: ignore[attr-defined]
        assert fe.session.get_session_options().intra_op_num_threads == 1
        est = solver.stages["flow_estimator_1"].inner  # type: ignore[attr-defined]
        assert est.compiled.get_property("INFERENCE_NUM_THREADS") == 1
        assert str(est.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()) == "f32"
        TorchSolver(exported[0]["ckpt"], options=BackendOptions(threads=1))
        assert torch.get_num_threads() == 1
        EngineSolver(folder, "ort").solve(*pair, parse_iterstop("rpnet"))
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS  # None: back to numba's default
    finally:
        torch.set_num_threads(before)


def test_second_load_uses_the_caches(exported, tmp_path: Path) -> None:
    """Compiled models come from OpenVINO's cache and the stage choice from the choice file the second time."""
    options = BackendOptions(threads=1, cache_dir=tmp_path / "c")
    first = EngineSolver(exported[1], "openvino", options=options)
    first.load()
    report = first.backend_report
    assert {c["how"] for c in report["openvino"]["stage_choice"].values()} == {"measured"}
    assert (tmp_path / "c" / ovmod.STAGE_CHOICE_FILE).is_file()
    first.close()
    second = EngineSolver(exported[1], "openvino", options=options)
    second.load()
    again = second.backend_report
    assert {c["how"] for c in again["openvino"]["stage_choice"].values()} == {"cached"}
    assert again["stage_backends"] == report["stage_backends"]
    on_openvino = [s for s, b in again["stage_backends"].items() if b.startswith("openvino")]
    assert all(again["openvino"]["compiled_from_cache"][s] for s in on_openvino)


def test_forced_stage_backends(exported) -> None:
    stages = {"feature_extractor": "ort", "flow_estimator_2": "ort"}
    solver = EngineSolver(exported[1], "openvino", options=BackendOptions(precision="fp32", stages=stages))
    solver.load()
    runs_on = solver.backend_report["stage_backends"]
    assert runs_on["feature_extractor"] == "ort-fp32" and runs_on["flow_estimator_2"] == "ort-fp32"
    assert solver.backend_report["openvino"]["stage_choice"]["feature_extractor"]["how"] == "forced"
    with pytest.raises(BackendOptionError, match=r"'stages' maps stage names"):
        BackendOptions(stages={"feature_extractor": "tensorrt"})


@pytest.mark.parametrize(("best_ms", "chosen"), [
    ({"openvino": 29.4, "ort": 28.7}, "openvino"),  # a near tie stays on OpenVINO: no second runtime to load
    ({"openvino": 110.1, "ort": 100.0}, "ort"),
    ({"openvino": 109.9, "ort": 100.0}, "openvino"),
    ({"openvino": 50.0, "ort": 80.0}, "openvino"),
])
def test_onnxruntime_must_win_by_the_margin(best_ms: dict, chosen: str) -> None:
    assert ovmod.choose_backend(best_ms) == chosen


def test_all_openvino_stages_never_import_onnxruntime(exported, pair, tmp_path: Path) -> None:
    import subprocess
    import sys

    moving, fixed = pair
    np.save(tmp_path / "moving.npy", moving)
    np.save(tmp_path / "fixed.npy", fixed)
    code = (
        "import sys, numpy as np\n"
        "from iirp.iterstop import parse_iterstop\n"
        "from iirp.manifest import STAGES\n"
        "from iirp.runtime.engines import BackendOptions\n"
        "from iirp.runtime.pipeline import EngineSolver\n"
        f"solver = EngineSolver({str(exported[1])!r}, 'openvino', options=BackendOptions(\n"
        "    precision='fp32', stages={s: 'openvino' for s in STAGES}))\n"
        f"trace = solver.solve(np.load({str(tmp_path / 'moving.npy')!r}), np.load({str(tmp_path / 'fixed.npy')!r}),\n"
        "                     parse_iterstop('official'))\n"
        "print(solver.backend_report['stage_backends'], 'onnxruntime' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False"), out
    assert "ort-" not in out


# --------------------------------------------------------------------------- bf16 (native CPUs only)


@needs_bf16
def test_bf16_stages_within_tolerance_of_fp32(exported) -> None:
    folder = exported[1]
    manifest = Manifest.load(folder)
    inputs = _stage_inputs(manifest)
    for stage in STAGES:
        outs = {}
        for precision in ("fp32", "bf16"):
            with OpenVinoBackend(stage, manifest, folder, "cpu", BackendOptions(precision=precision)) as backend:
                outs[precision] = backend.infer(inputs[stage])
                assert backend.runs_on == f"openvino-{precision}"
        for name, value in outs["bf16"].items():
            check = compare(stage, name, "random", "openvino fp32", value, outs["fp32"][name], BF16_STAGE_TOLERANCE)
            assert check.passed, check
            # and not silently fp32: bf16 rounding shows
            assert not compare(stage, name, "random", "fp32", value, outs["fp32"][name], Tolerance(0, 0)).passed


@needs_bf16
def test_bf16_loop_within_gate_of_fp32(exported, pair) -> None:
    folder = exported[1]
    rule = parse_iterstop("official")
    traces = {p: EngineSolver(folder, "openvino", options=BackendOptions(precision=p, stages=ALL_OPENVINO))
              .solve(*pair, rule) for p in ("fp32", "bf16")}
    assert traces["bf16"].iterations == traces["fp32"].iterations
    mask = pair[1] > 0.05
    assert flow_difference(traces["bf16"].flow, traces["fp32"].flow, mask)["p99_9"] <= FLOW_P999_VOXELS
