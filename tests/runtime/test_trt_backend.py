"""The TensorRT backend and the device pipeline, without a GPU or TensorRT.

TensorRT cannot be installed here, so ``tensorrt`` is a fake module that follows TensorRT's
documented name-based API (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``...).
Device arrays live in host memory behind ``__cuda_array_interface__``
(:mod:`cudahost.placement`), and the CUDA kernels run as their host builds (:mod:`cudahost`).

* With known outputs, the backend binds the arrays' own addresses (zero copies), allocates each
  output once and reuses it, checks shapes and dtypes, and refuses engines built for another GPU.
* With the fake engine running the real ONNX stage (onnxruntime, on the memory at the bound
  addresses), the whole IterStop loop on the device placement gives the iterations and the flow of
  the onnxruntime host pipeline: the device code path, pointer for pointer, on any machine.

What stays unverified: TensorRT itself and a real GPU (see README, "Verification").
"""

from __future__ import annotations

import ctypes
import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from cudahost.build import CompilerNotFoundError, build_source, find_compiler
from cudahost.device import HostDevice
from cudahost.placement import HostCudaPlacement
from support import tiny_export

from iirp.iterstop import parse_iterstop
from iirp.manifest import MANIFEST_NAME, STAGES, Manifest, ManifestMismatchError, sha256_file
from iirp.runtime.engines import StageSet
from iirp.runtime.pipeline import EngineSolver, register_arrays_with_engines

pytest.importorskip("torch")  # the tiny export
ort = pytest.importorskip("onnxruntime")

GPU = {"gpu_name": "Fake H200", "compute_capability": "9.0"}
TRT_VERSION = "11.4.0.106"


def _from_address(pointer: int, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 array at a (host) address, without a copy."""
    count = int(np.prod(shape))
    buffer = (ctypes.c_float * count).from_address(pointer)
    return np.ctypeslib.as_array(buffer).reshape(shape)


class FakeTensorRT:
    """A ``tensorrt`` module: engines are ONNX files; ``execute_async_v3`` runs ``compute`` on the bound memory."""

    def __init__(self, compute: Callable[[bytes, dict[str, np.ndarray]], dict[str, np.ndarray]]) -> None:
        self.compute = compute
        self.executions: list[dict[str, Any]] = []
        fake = self
        module = types.ModuleType("tensorrt")
        module.__version__ = TRT_VERSION  # type: ignore[attr-defined]
        module.float32 = "float32"  # type: ignore[attr-defined]

        class Logger:
            WARNING = 2

            def __init__(self, level: int) -> None:
                self.level = level

        class Context:
            def __init__(self, engine: "Engine") -> None:
                self.engine = engine
                self.shapes: dict[str, tuple[int, ...]] = {}
                self.addresses: dict[str, int] = {}

            def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
                self.shapes[name] = tuple(shape)
                return True

            def set_tensor_address(self, name: str, pointer: int) -> bool:
                self.addresses[name] = int(pointer)
                return True

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                return self.engine.output_shape(name, self.shapes)

            def execute_async_v3(self, stream: int) -> bool:
                inputs = {n: _from_address(self.addresses[n], s) for n, s in self.shapes.items()}
                outputs = fake.compute(self.engine.blob, inputs)
                fake.executions.append({"stream": stream, "addresses": dict(self.addresses),
                                        "shapes": dict(self.shapes)})
                for name, value in outputs.items():
                    target = _from_address(self.addresses[name], value.shape)
                    target[...] = value
                return True

        class Engine:
            def __init__(self, blob: bytes) -> None:
                self.blob = blob
                self.session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])

            def output_shape(self, name: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
                feeds = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
                index = [o.name for o in self.session.get_outputs()].index(name)
                return tuple(self.session.run(None, feeds)[index].shape)

            def get_tensor_dtype(self, name: str) -> str:
                return "float32"

            def create_execution_context(self) -> Context:
                return Context(self)

        class Runtime:
            def __init__(self, logger: Logger) -> None:
                self.logger = logger

            def deserialize_cuda_engine(self, blob: bytes) -> Engine:
                return Engine(blob)

        module.Logger = Logger  # type: ignore[attr-defined]
        module.Runtime = Runtime  # type: ignore[attr-defined]
        module.nptype = lambda dtype: np.float32  # type: ignore[attr-defined]
        self.module = module


def _run_onnx(blob: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {k: np.ascontiguousarray(v) for k, v in inputs.items()})))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    return tiny_export(tmp_path_factory.mktemp("trt"))


def _trt_folder(exported: Path, target: Path) -> Path:
    """The tiny export with an 'engine' per stage (its ONNX bytes) and a TensorRT record, as --trt writes them."""
    folder = Path(shutil.copytree(exported, target))
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    for stage in STAGES:
        engine = folder / f"{stage}.engine"
        engine.write_bytes((folder / f"{stage}.onnx").read_bytes())
        manifest["stages"][stage].update(engine_file=engine.name, engine_sha256=sha256_file(engine))
    manifest["tensorrt"] = {**GPU, "tensorrt_version": TRT_VERSION, "timing_cache": None}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


@pytest.fixture()
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTensorRT]:
    fake = FakeTensorRT(_run_onnx)
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    from iirp.kernels import cuda_build

    monkeypatch.setattr(cuda_build, "gpu_identity", lambda device_id: dict(GPU))
    yield fake


@pytest.fixture(scope="module")
def host_device() -> Iterator[HostDevice]:
    try:
        find_compiler()
    except CompilerNotFoundError as err:
        pytest.skip(str(err))
    libraries = {name: build_source(name) for name in ("warp.cu", "upsample.cu", "score.cu")}
    with pytest.MonkeyPatch.context() as patch:
        device = HostDevice(libraries)
        device.install(patch)
        yield device


# --------------------------------------------------------------------------- the backend alone


def test_binds_the_arrays_own_memory_and_reuses_outputs(exported: tuple[dict, Path], tmp_path: Path,
                                                          fake_trt: FakeTensorRT) -> None:
    fake_trt.compute = lambda blob, inputs: {"flow": np.full((1, 3, 4, 4, 4), 7.0, np.float32)}
    folder = _trt_folder(exported[1], tmp_path / "engines")
    manifest = Manifest.load(folder)
    placement = HostCudaPlacement()
    stages = StageSet(manifest, folder, "trt", placement)
    with stages:
        backend = stages["flow_estimator_4"]
        assert backend.reuses_outputs and backend.runs_on == "trt-fp32"
        feeds = {name: placement.upload(np.random.default_rng(i).random((1, 32, 4, 4, 4), dtype=np.float32))
                 for i, name in enumerate(("moving_features", "fixed_features"))}
        first = backend.infer(feeds)["flow"]
        second = backend.infer(feeds)["flow"]
    bound = fake_trt.executions[0]["addresses"]
    for name, array in feeds.items():  # zero copies: the engine reads the arrays themselves
        assert bound[name] == array.__cuda_array_interface__["data"][0]
    assert bound["flow"] == first.__cuda_array_interface__["data"][0]
    assert first is second and fake_trt.executions[1]["addresses"] == bound  # one output buffer, reused
    assert first.shape == (1, 3, 4, 4, 4) and first.dtype == np.float32 and np.all(np.asarray(first) == 7.0)
    assert [e["stream"] for e in fake_trt.executions] == [placement.stream_handle] * 2
    assert sum(a.shape == (1, 3, 4, 4, 4) for a in placement.allocated) == 1


def test_refuses_engines_of_another_gpu_or_tensorrt(exported: tuple[dict, Path], tmp_path: Path,
                                                     fake_trt: FakeTensorRT, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _trt_folder(exported[1], tmp_path / "engines")
    manifest = Manifest.load(folder)
    from iirp.kernels import cuda_build

    monkeypatch.setattr(cuda_build, "gpu_identity", lambda device_id: {"gpu_name": "Fake A100",
                                                                       "compute_capability": "8.0"})
    with pytest.raises(ManifestMismatchError, match=r"built for Fake H200 \(sm 9\.0, TensorRT 11\.4\.0\.106\); "
                                                    r"this is Fake A100 \(sm 8\.0"):
        with StageSet(manifest, folder, "trt", HostCudaPlacement()):
            pass


def test_runs_on_cuda_only(exported: tuple[dict, Path], tmp_path: Path) -> None:
    from iirp.errors import IirpError

    folder = _trt_folder(exported[1], tmp_path / "engines")
    with pytest.raises(IirpError, match=r"engine 'trt' runs on cuda, not on cpu"):
        EngineSolver(folder, "trt", "cpu")


def test_a_wrong_input_is_refused_before_tensorrt_runs(exported: tuple[dict, Path], tmp_path: Path,
                                                       fake_trt: FakeTensorRT) -> None:
    folder = _trt_folder(exported[1], tmp_path / "engines")
    placement = HostCudaPlacement()
    with StageSet(Manifest.load(folder), folder, "trt", placement) as stages:
        wrong = placement.upload(np.zeros((1, 16, 4, 4, 4), np.float32))
        with pytest.raises(ValueError, match=r"'moving_features' must have shape \(1, 32, 4, 4, 4\)"):
            stages["flow_estimator_4"].infer({"moving_features": wrong, "fixed_features": wrong})
    assert not fake_trt.executions


# --------------------------------------------------------------------------- the device pipeline


@pytest.mark.cudahost
@pytest.mark.parametrize("rule", ["official", "paper", "fixed:2,1,2,1"])
def test_device_pipeline_matches_the_host_pipeline(rule: str, exported: tuple[dict, Path], tmp_path: Path,
                                                   fake_trt: FakeTensorRT, host_device: HostDevice) -> None:
    """TensorRT (faked by onnxruntime on the bound memory) + the CUDA kernels (host builds) on device arrays."""
    data, engines = exported
    import SimpleITK as sitk

    from iirp.runtime.geometry import array_from_image

    def _volume(path: Path) -> np.ndarray:
        array = array_from_image(sitk.ReadImage(str(path)))
        return (array - array.min()) / (array.max() - array.min())

    moving, fixed = _volume(data["moving"]), _volume(data["fixed"])
    iterstop = parse_iterstop(rule)
    host = EngineSolver(engines, "ort").solve(moving, fixed, iterstop)
    folder = _trt_folder(engines, tmp_path / "engines")
    placement = HostCudaPlacement()
    with StageSet(Manifest.load(folder), folder, "trt", placement) as stages:
        device = register_arrays_with_engines(stages, moving, fixed, iterstop)
    assert device.iterations == host.iterations and device.estimator_passes == host.estimator_passes
    assert [len(s) for s in device.scores] == [len(s) for s in host.scores]
    flat = [v for level in device.scores for v in level]
    assert flat == pytest.approx([v for level in host.scores for v in level], abs=1e-9)  # sums in another order
    np.testing.assert_array_equal(device.flow, host.flow)  # every kernel is bit for bit the numba one
    assert isinstance(device.flow, np.ndarray) and not isinstance(device.flow, type(placement.upload(fixed)))
    assert {"upload", "features", "kernels", "download", "iirp"} <= set(device.timings_ms)
