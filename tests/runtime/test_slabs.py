"""Slabs (:mod:`iirp.runtime.slabs`, ``--slabs``): the window arithmetic, the slab loop against a whole run of a
chain of zero-padded convolutions (and that a halo one voxel short is caught), the halo read from ONNX graphs, and
engine ``openvino`` with the finest estimator in slabs: the same flow and iterations as whole, named in the report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import tiny_export

from iirp.runtime.slabs import SlabError, SlabWindow, WarpedInput, run_in_slabs, slab_windows, stage_halo

#: Slabbed vs whole OpenVINO flows (voxels). The slab keeps the same inputs for every voxel, but OpenVINO may pick
#: another convolution kernel (another summation order) for the slab's shape: float32 rounding, 4e-7 seen at 32^3
#: after three passes. At 160x192x160 on the development machine the flows were bit-identical (README, Memory).
SLAB_FLOW_ATOL_VOXELS = 1e-5


@settings(max_examples=300, deadline=None)
@given(extent=st.integers(1, 300), slabs=st.integers(1, 16), halo=st.integers(0, 8))
def test_windows_tile_the_axis_and_keep_the_halo(extent: int, slabs: int, halo: int) -> None:
    if slabs > extent:
        with pytest.raises(SlabError, match="cannot cut"):
            slab_windows(extent, slabs, halo)
        return
    windows = slab_windows(extent, slabs, halo)
    assert 1 <= len(windows) <= slabs
    lengths = {w.stop - w.start for w in windows}
    assert lengths == {min(-(-extent // slabs) + 2 * halo, extent)}  # one compiled shape for all
    kept = [i for w in windows for i in range(w.keep_start, w.keep_stop)]
    assert kept == list(range(extent))  # every voxel kept once, in order
    for w in windows:
        assert 0 <= w.start <= w.keep_start < w.keep_stop <= w.stop <= extent
        assert w.start == 0 or w.keep_start - w.start >= halo
        assert w.stop == extent or w.stop - w.keep_stop >= halo


@pytest.mark.parametrize(("slabs", "halo", "message"), [
    (0, 1, "'slabs' must be an integer >= 1, got 0"), (True, 1, "got True"), (2, -1, "'halo' must be >= 0"),
])
def test_window_errors(slabs: int, halo: int, message: str) -> None:
    with pytest.raises(SlabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        slab_windows(10, slabs, halo)


def _correlate(volume: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``(X, Y, Z)`` zero-padded 3x3x3 correlation, the taps summed in one fixed order."""
    padded = np.pad(volume, 1)
    out = np.zeros_like(volume)
    nx, ny, nz = volume.shape
    for i, j, k in np.ndindex(3, 3, 3):
        out += kernel[i, j, k] * padded[i:i + nx, j:j + ny, k:k + nz]
    return out


def _conv_chain(layers: int, seed: int = 0):
    """``(N, C, X, Y, Z)`` -> same shape: ``layers`` zero-padded 3x3x3 convolutions (halo = layers)."""
    kernels = np.random.default_rng(seed).standard_normal((layers, 3, 3, 3)).astype(np.float32)

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feeds["a"] - np.float32(0.5) * feeds["b"]
        for k in kernels:
            x = np.stack([np.stack([_correlate(v, k) for v in n]) for n in x])
        return {"out": x.astype(np.float32)}

    return run


@pytest.mark.parametrize("slabs", [3, 4, 6])  # middle slabs keep exactly ``halo`` voxels from both cut faces
def test_slab_loop_equals_the_whole_run(slabs: int) -> None:
    rng = np.random.default_rng(1)
    feeds = {name: rng.random((1, 2, 24, 6, 5), dtype=np.float32) for name in ("a", "b")}
    chain = _conv_chain(layers=3)
    whole = chain(feeds)["out"]
    got = run_in_slabs(chain, feeds, slab_windows(24, slabs, halo=3), {"out": whole.shape})["out"]
    assert got.dtype == np.float32 and got.shape == whole.shape
    np.testing.assert_array_equal(got, whole)
    short = run_in_slabs(chain, feeds, slab_windows(24, slabs, halo=2), {"out": whole.shape})["out"]
    assert not np.array_equal(short, whole)  # one voxel of halo short: the cut faces' padding leaks in


@pytest.mark.parametrize("slabs", [2, 3, 5])
def test_a_warped_input_is_warped_per_slab_as_the_whole_warp(slabs: int) -> None:
    from iirp.kernels import warp

    rng = np.random.default_rng(2)
    src = rng.random((2, 24, 6, 5), dtype=np.float32)
    flow = ((rng.random((3, 24, 6, 5), dtype=np.float32) - 0.5) * 6).astype(np.float32)
    other = rng.random((1, 2, 24, 6, 5), dtype=np.float32)
    chain = _conv_chain(layers=3)
    whole = chain({"a": warp(src, flow)[None], "b": other})["out"]
    deferred = WarpedInput(src, flow)
    assert deferred.shape == (1, 2, 24, 6, 5) and deferred.dtype == np.float32
    got = run_in_slabs(chain, {"a": deferred, "b": other}, slab_windows(24, slabs, halo=3), {"out": whole.shape})
    np.testing.assert_array_equal(got["out"], whole)
    np.testing.assert_array_equal(deferred.whole(), warp(src, flow)[None])


def test_keep_in_slab() -> None:
    assert SlabWindow(4, 14, 6, 10).keep_in_slab == slice(2, 6)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    pytest.importorskip("torch")  # to export the tiny checkpoint
    return tiny_export(tmp_path_factory.mktemp("slabs"))


def test_halo_of_the_exported_stages(exported: tuple[dict, Path]) -> None:
    folder = exported[1]
    for level in (1, 2, 3, 4):
        assert stage_halo(folder / f"flow_estimator_{level}.onnx") == 5  # Conv1, two ResBlocks, Conv4, Conv5
    with pytest.raises(SlabError, match="operation AveragePool is not local along X"):
        stage_halo(folder / "feature_extractor.onnx")


def _one_node_model(path: Path, node_kwargs: dict, op: str = "Conv") -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.zeros((1, 1, 3, 3, 3), np.float32), "w")
    inputs = ["x", "w"] if op == "Conv" else ["x", "x"]
    node = helper.make_node(op, inputs, ["y"], **node_kwargs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    onnx.save(helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize(("kwargs", "op", "message"), [
    ({"pads": [1] * 6}, "Conv", None),
    ({"pads": [1] * 6, "strides": [2, 1, 1]}, "Conv", "strided or not 'same'-padded"),
    ({"pads": [0] * 6}, "Conv", "strided or not 'same'-padded"),
    ({"pads": [2] * 6, "dilations": [2, 2, 2]}, "Conv", None),
    ({"axis": 2}, "Concat", "Concat along axis 2"),
])
def test_halo_refuses_what_is_not_local(tmp_path: Path, kwargs: dict, op: str, message: str | None) -> None:
    path = _one_node_model(tmp_path / "m.onnx", kwargs, op)
    if message is None:
        assert stage_halo(path) == kwargs.get("dilations", [1])[0]
    else:
        with pytest.raises(SlabError, match=message):
            stage_halo(path)


# --------------------------------------------------------------------------- engine openvino --slabs


@pytest.fixture(autouse=False)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IIRP_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("slabs", [2, 4])
def test_openvino_slabs_give_the_whole_run(exported, private_cache, slabs: int) -> None:
    pytest.importorskip("openvino")
    from iirp.iterstop import parse_iterstop
    from iirp.manifest import STAGES
    from iirp.runtime.engines import BackendOptions
    from iirp.runtime.imageio import read_image
    from iirp.runtime.pipeline import EngineSolver
    from iirp.runtime.register import RegistrationOptions, prepare_pair

    data, folder = exported
    solver_whole = EngineSolver(folder, "openvino", options=BackendOptions(
        precision="fp32", stages={s: "openvino" for s in STAGES}))
    prepared = prepare_pair(read_image(data["fixed"], "fixed"), read_image(data["moving"], "moving"),
                            solver_whole.model_size, RegistrationOptions())
    rule = parse_iterstop("fixed:1,1,1,3")  # three passes at the sliced level
    whole = solver_whole.solve(prepared.moving, prepared.fixed, rule)
    sliced = EngineSolver(folder, "openvino", options=BackendOptions(precision="fp32", slabs=slabs))
    trace = sliced.solve(prepared.moving, prepared.fixed, rule)
    assert trace.iterations == whole.iterations
    np.testing.assert_allclose(trace.flow, whole.flow, rtol=0, atol=SLAB_FLOW_ATOL_VOXELS)
    report = sliced.backend_report
    assert report["slabs"] == slabs
    assert report["stage_backends"]["flow_estimator_1"] == f"openvino-fp32 in {slabs} slabs"
    assert "slabs" not in report["stage_backends"]["flow_estimator_2"]
    assert report["openvino"]["stage_choice"]["flow_estimator_1"]["how"] == "slabs"
    # the memory option also unloads every OpenVINO stage after the pair; the next pair loads them from the cache
    on_openvino = [b.inner for b in sliced.stages.stages.values() if b.runs_on.startswith("openvino")]
    assert on_openvino and not any(b.loaded for b in on_openvino)
    assert all(b.inner.loaded for b in solver_whole.stages.stages.values() if b.runs_on.startswith("openvino"))
    again = sliced.solve(prepared.moving, prepared.fixed, rule)
    assert again.iterations == trace.iterations
    np.testing.assert_array_equal(again.flow, trace.flow)


def test_slabs_cannot_be_forced_onto_ort(exported, private_cache) -> None:
    pytest.importorskip("openvino")
    from iirp.runtime.engines import BackendOptionError, BackendOptions
    from iirp.runtime.pipeline import EngineSolver

    solver = EngineSolver(exported[1], "openvino", options=BackendOptions(
        precision="fp32", slabs=2, stages={"flow_estimator_1": "ort"}))
    with pytest.raises(BackendOptionError, match="--slabs runs flow_estimator_1 on OpenVINO; it cannot also be put"):
        solver.load()


@pytest.mark.parametrize(("extra", "needle"), [
    (["--slabs", "0", "--engine", "openvino"], "'slabs' (--slabs) must be an integer from 1 to 16, got 0"),
    (["--slabs", "17", "--engine", "openvino"], "must be an integer from 1 to 16, got 17"),
    (["--slabs", "2"], "--slabs is for engine 'openvino' (it runs the finest flow estimator in slabs); engine 'ort'"),
])
def test_slab_option_errors(exported, private_cache, tmp_path: Path, extra: list[str], needle: str) -> None:
    from typer.testing import CliRunner

    from iirp.cli import run_app

    data, engines = exported
    out = tmp_path / "out"
    result = CliRunner().invoke(run_app, [str(data["fixed"]), str(data["moving"]), "--engines", str(engines),
                                          "-o", str(out), *extra])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("iirp-run: error: "), result.stderr
    assert needle in lines[0]
    assert not out.exists()


def test_dynamic_export_runs_slabs_on_its_model_grid_only(exported, private_cache, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    from iirp.errors import IirpError
    from iirp.export import export_checkpoint
    from iirp.manifest import Manifest
    from iirp.runtime.engines import BackendOptions
    from iirp.runtime.engines.openvino import OpenVinoBackend

    folder = tmp_path / "dynamic"
    export_checkpoint(exported[0]["ckpt"], folder, dynamic=True, verify=False, progress=False, exporter="torchscript")
    manifest = Manifest.load(folder)
    rng = np.random.default_rng(3)
    feeds = {t: rng.random((1, 8, *manifest.size), dtype=np.float32) for t in ("moving_features", "fixed_features")}
    stage = "flow_estimator_1"
    with OpenVinoBackend(stage, manifest, folder, "cpu", BackendOptions(precision="fp32")) as whole, \
            OpenVinoBackend(stage, manifest, folder, "cpu", BackendOptions(precision="fp32", slabs=2)) as sliced:
        assert sliced.runs_on == "openvino-fp32 in 2 slabs"
        np.testing.assert_allclose(sliced.infer(feeds)["flow"], whole.infer(feeds)["flow"], rtol=0, atol=1e-5)
        other = {name: rng.random((1, 8, 40, *manifest.size[1:]), dtype=np.float32) for name in feeds}
        with pytest.raises(IirpError, match=r"--slabs was set up for the model grid's X = 32, got X = 40"):
            sliced.infer(other)


# --------------------------------------------------------------------------- --low-memory


def test_low_memory_ort_drops_the_arena_and_keeps_the_flow(exported, private_cache) -> None:
    from iirp.iterstop import parse_iterstop
    from iirp.runtime.engines import BackendOptions
    from iirp.runtime.imageio import read_image
    from iirp.runtime.pipeline import EngineSolver
    from iirp.runtime.register import RegistrationOptions, prepare_pair

    data, folder = exported
    default = EngineSolver(folder, "ort")
    lean = EngineSolver(folder, "ort", options=BackendOptions(low_memory=True))
    prepared = prepare_pair(read_image(data["fixed"], "fixed"), read_image(data["moving"], "moving"),
                            default.model_size, RegistrationOptions())
    rule = parse_iterstop("official")
    a, b = default.solve(prepared.moving, prepared.fixed, rule), lean.solve(prepared.moving, prepared.fixed, rule)
    assert a.iterations == b.iterations
    np.testing.assert_array_equal(a.flow, b.flow)
    arenas = {name: stage.session.get_session_options().enable_cpu_mem_arena
              for name, stage in lean.stages.stages.items()}
    assert arenas == {name: False for name in arenas}
    assert all(s.session.get_session_options().enable_cpu_mem_arena for s in default.stages.stages.values())
    assert lean.backend_report["low_memory"] is True and lean.backend_report["slabs"] == 1


@pytest.mark.parametrize(("extent", "halo", "slabs"), [
    (160, 5, 8), (192, 5, 8), (64, 5, 3), (40, 5, 2), (32, 5, 1), (16, 5, 1), (160, 0, 8), (4, 0, 4),
])
def test_affordable_slabs(extent: int, halo: int, slabs: int) -> None:
    from iirp.runtime.slabs import affordable_slabs

    assert affordable_slabs(extent, halo, 8) == slabs
    assert slabs == 1 or 2 * halo * slabs <= extent / 2  # the halos add at most half of the stage


def test_low_memory_openvino_slabs_fit_the_grid(exported, private_cache) -> None:
    pytest.importorskip("openvino")
    from iirp.runtime.engines import LOW_MEMORY_SLABS, BackendOptions
    from iirp.runtime.pipeline import EngineSolver

    assert LOW_MEMORY_SLABS == 8
    # X = 32 affords no slab of a halo-5 stage under --low-memory (it would double the arithmetic); --slabs insists
    for options, runs_on, slabs in ((BackendOptions(precision="fp32", low_memory=True), "openvino-fp32", 1),
                                    (BackendOptions(precision="fp32", low_memory=True, slabs=2),
                                     "openvino-fp32 in 2 slabs", 2)):
        solver = EngineSolver(exported[1], "openvino", options=options)
        solver.load()
        assert solver.backend_report["stage_backends"]["flow_estimator_1"] == runs_on
        assert solver.backend_report["slabs"] == slabs and solver.backend_report["low_memory"] is True
        solver.close()


def test_low_memory_option_errors(exported, private_cache, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from iirp.cli import run_app
    from iirp.runtime.engines import BackendOptionError, BackendOptions

    with pytest.raises(BackendOptionError, match="'low_memory' must be True or False, got 'yes'"):
        BackendOptions(low_memory="yes")  # type: ignore[arg-type]
    data, engines = exported
    out = tmp_path / "out"
    result = CliRunner().invoke(run_app, [str(data["fixed"]), str(data["moving"]), "--engines", str(engines),
                                          "--engine", "torch", "--low-memory", "-o", str(out)])
    assert result.exit_code == 2 and not out.exists()
    assert result.stderr.strip().splitlines() == [
        "iirp-run: error: --low-memory is for engines 'ort' and 'openvino' on the CPU, got engine 'torch' on cpu"]
    result = CliRunner().invoke(run_app, [str(data["fixed"]), str(data["moving"]), "--engines", str(engines),
                                          "--low-memory", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    import json

    assert json.loads((out / "report.json").read_text())["low_memory"] is True


def test_a_stage_in_slabs_never_holds_the_whole_warped_features(exported, private_cache,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The finest estimator in slabs warps its moving features slab by slab (WarpedInput); whole, it gets them warped
    by the kernel set; another backend given a WarpedInput gets the whole warp."""
    pytest.importorskip("openvino")
    import iirp.kernels
    from iirp.iterstop import parse_iterstop
    from iirp.runtime.engines import BackendOptions
    from iirp.runtime.imageio import read_image
    from iirp.runtime.pipeline import EngineSolver
    from iirp.runtime.register import RegistrationOptions, prepare_pair

    data, folder = exported
    rule = parse_iterstop("fixed:1,1,1,2")
    whole_warps: list[tuple[int, ...]] = []
    fills: list[tuple[int, int]] = []
    real_warp, real_fill = iirp.kernels.warp, WarpedInput.fill

    def counting_warp(src, flow, **kwargs):  # type: ignore[no-untyped-def]
        whole_warps.append(src.shape)
        return real_warp(src, flow, **kwargs)

    def counting_fill(self, dst, start, stop):  # type: ignore[no-untyped-def]
        fills.append((start, stop))
        return real_fill(self, dst, start, stop)

    monkeypatch.setattr(iirp.kernels, "warp", counting_warp)
    monkeypatch.setattr(WarpedInput, "fill", counting_fill)
    solvers = {n: EngineSolver(folder, "openvino", options=BackendOptions(precision="fp32", slabs=n)) for n in (1, 2)}
    prepared = prepare_pair(read_image(data["fixed"], "fixed"), read_image(data["moving"], "moving"),
                            solvers[1].model_size, RegistrationOptions())
    finest = (8, *solvers[1].model_size)  # the level-1 moving features
    traces = {}
    for n, solver in solvers.items():
        whole_warps.clear()
        fills.clear()
        traces[n] = solver.solve(prepared.moving, prepared.fixed, rule)
        assert whole_warps.count(finest) == (2 if n == 1 else 0), n
        assert len(fills) == (0 if n == 1 else 2 * 2), n  # two passes at level 1, two slabs each
    np.testing.assert_allclose(traces[2].flow, traces[1].flow, rtol=0, atol=SLAB_FLOW_ATOL_VOXELS)

    from iirp.runtime.engines.ort import OrtBackend

    moving, fixed = (np.random.default_rng(3).random((8, *solvers[1].model_size), dtype=np.float32) for _ in "ab")
    flow = np.zeros((3, *solvers[1].model_size), np.float32)
    with OrtBackend("flow_estimator_1", solvers[1].manifest, folder) as stage:
        assert not stage.takes_warped_input
        got = stage.infer({"moving_features": WarpedInput(moving, flow), "fixed_features": fixed[None]})
        want = stage.infer({"moving_features": moving[None], "fixed_features": fixed[None]})
    np.testing.assert_array_equal(got["flow"], want["flow"])  # a zero flow's warp is the features themselves
