"""TensorRT engine building: the parts that run without TensorRT (a fake ``tensorrt`` module).

The real TensorRT path is unverified here (no GPU, TensorRT not installable); these tests
check the clear error, the profile shapes, and that build_engines drives the documented API
(strong typing, one profile per engine, timing cache load/save) and records the results.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from export_support import Exported

from iirp.export import EngineBuildError
from iirp.export.tensorrt import TIMING_CACHE, build_engines, profile_shapes, require_tensorrt
from iirp.manifest import Manifest, TensorSpec


def test_require_tensorrt_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EngineBuildError, match=r"^--trt needs the TensorRT Python package \(import tensorrt failed: "):
        require_tensorrt()


def _manifest(dynamic: bool) -> Manifest:
    return Manifest(
        source_sha256="0", model={}, model_grid={"size": [160, 192, 160]}, precision="fp16", opset=18,
        dynamic=dynamic, stages={},
        dynamic_range={"min": [16, 16, 16], "opt": [160, 192, 160], "max": [256, 256, 256]} if dynamic else None,
    )


def test_profile_shapes_static_and_dynamic() -> None:
    static = TensorSpec("moving_features", [1, 32, 20, 24, 20])
    assert profile_shapes(static, _manifest(False)) == ((1, 32, 20, 24, 20),) * 3
    symbolic = TensorSpec("moving_features", [1, 32, "X/8", "Y/8", "Z/8"])
    assert profile_shapes(symbolic, _manifest(True)) == ((1, 32, 2, 2, 2), (1, 32, 20, 24, 20), (1, 32, 32, 32, 32))
    image = TensorSpec("image", [2, 1, "X", "Y", "Z"])
    assert profile_shapes(image, _manifest(True)) == ((2, 1, 16, 16, 16), (2, 1, 160, 192, 160), (2, 1, 256, 256, 256))


class _FakeTrt:
    """Records the calls build_engines makes; mimics TensorRT 10's Python API."""

    def __init__(self, version: str) -> None:
        self.calls: list[tuple] = []
        fake = self
        mod = types.ModuleType("tensorrt")
        mod.__version__ = version  # type: ignore[attr-defined]

        class Logger:
            WARNING = 2

            def __init__(self, level: int) -> None:
                pass

        class Cache:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def serialize(self) -> bytes:
                return b"cache:" + self.data

        class Config:
            def clear_flag(self, flag: int) -> None:
                fake.calls.append(("clear_flag", flag))

            def create_timing_cache(self, data: bytes) -> Cache:
                fake.calls.append(("create_timing_cache", data))
                return Cache(data)

            def set_timing_cache(self, cache: Cache, ignore: bool) -> bool:
                fake.calls.append(("set_timing_cache", ignore))
                return True

            def add_optimization_profile(self, profile: object) -> int:
                fake.calls.append(("add_optimization_profile",))
                return 0

        class Profile:
            def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
                fake.calls.append(("set_shape", name, lo, opt, hi))

        class Parser:
            num_errors = 0

            def __init__(self, network: object, logger: object) -> None:
                pass

            def parse(self, data: bytes) -> bool:
                fake.calls.append(("parse", len(data)))
                return True

        class Builder:
            def __init__(self, logger: object) -> None:
                pass

            def create_network(self, flags: int) -> object:
                fake.calls.append(("create_network", flags))
                return object()

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: object, config: Config) -> bytes:
                return b"plan"

        mod.Logger = Logger  # type: ignore[attr-defined]
        mod.Builder = Builder  # type: ignore[attr-defined]
        mod.OnnxParser = Parser  # type: ignore[attr-defined]
        mod.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)  # type: ignore[attr-defined]
        mod.BuilderFlag = types.SimpleNamespace(TF32=6)  # type: ignore[attr-defined]
        self.module = mod


@pytest.mark.parametrize(("version", "flags"), [("10.13.0", 1 << 1), ("11.4.0", 0)])
def test_build_engines_with_a_fake_tensorrt(fp32_export: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            version: str, flags: int) -> None:
    import shutil

    folder = tmp_path / "out"
    shutil.copytree(fp32_export.folder, folder)
    (folder / TIMING_CACHE).write_bytes(b"old")
    fake = _FakeTrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    monkeypatch.setattr("iirp.export.tensorrt._gpu", lambda: ("Fake GPU", "9.0"))
    manifest = build_engines(folder, Manifest.load(folder))
    assert manifest.tensorrt == {"gpu_name": "Fake GPU", "compute_capability": "9.0", "tensorrt_version": version,
                                 "timing_cache": TIMING_CACHE, "strongly_typed": True}
    manifest.save(folder)
    Manifest.load(folder).verify_files(folder, engines=True)
    for name, stage in manifest.stages.items():
        assert stage.engine_file == f"{name}.engine" and (folder / stage.engine_file).read_bytes() == b"plan"
    assert (folder / TIMING_CACHE).read_bytes() == b"cache:old"
    assert [c for c in fake.calls if c[0] == "create_network"] == [("create_network", flags)] * 5
    assert [c for c in fake.calls if c[0] == "create_timing_cache"] == [("create_timing_cache", b"old")]
    assert ("clear_flag", 6) in fake.calls  # fp32: no TF32
    assert len([c for c in fake.calls if c[0] == "add_optimization_profile"]) == 5
    assert ("set_shape", "image", (2, 1, 16, 24, 32), (2, 1, 16, 24, 32), (2, 1, 16, 24, 32)) in fake.calls
