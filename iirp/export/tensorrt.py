"""Serialized TensorRT engines from the exported ONNX stages (TensorRT 10 and 11).

UNVERIFIED: written against the TensorRT 10/11 Python API documentation and type-checked
with a local stub (``tests/export/stubs/tensorrt``); it has never run, because TensorRT cannot
be installed on the machines this was developed on. Treat the first real build as its test.

What it does, per stage:

* a strongly typed network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` on TensorRT 10;
  TensorRT 11 is always strongly typed and ignores the flag), so the precision is the ONNX
  file's own (float32 or float16 graph, see :mod:`iirp.export.fp16`), never a builder flag;
  TF32 is switched off for fp32 files so they keep fp32 accuracy;
* one optimization profile: min = opt = max = the static shape, or min/opt/max from the
  manifest's dynamic range (``opt`` = the export shape);
* a shared timing cache, loaded from ``timing.cache`` when present and saved after the builds.

Import this module only where TensorRT is wanted: it imports ``tensorrt`` inside functions.
"""

from __future__ import annotations

import shutil
import subprocess
import types
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from iirp.atomic import write_bytes
from iirp.export.errors import EngineBuildError
from iirp.manifest import Manifest, StageSpec, TensorSpec, sha256_file

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = ["TIMING_CACHE", "ENGINE_SUFFIX", "require_tensorrt", "profile_shapes", "build_engines"]

TIMING_CACHE = "timing.cache"
ENGINE_SUFFIX = ".engine"


def require_tensorrt() -> types.ModuleType:
    """Import and return the ``tensorrt`` module.

    Raises:
        EngineBuildError: it cannot be imported (one line naming the reason).
    """
    try:
        import tensorrt
    except Exception as err:  # ImportError, or a broken install raising OSError/RuntimeError
        raise EngineBuildError(
            f"--trt needs the TensorRT Python package (import tensorrt failed: {err}); "
            "install TensorRT 10 or 11 on a machine with an NVIDIA GPU, or export without --trt"
        ) from err
    return tensorrt


def profile_shapes(spec: TensorSpec, manifest: Manifest) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(min, opt, max)`` shapes of one input: the static shape three times, or the dynamic range."""
    opt = spec.resolve(dict(zip("XYZ", manifest.size)))
    if not manifest.dynamic or manifest.dynamic_range is None:
        return opt, opt, opt
    lo = spec.resolve(dict(zip("XYZ", manifest.dynamic_range["min"])))
    hi = spec.resolve(dict(zip("XYZ", manifest.dynamic_range["max"])))
    return lo, opt, hi


def _gpu() -> tuple[str, str]:
    """GPU name and compute capability ``"major.minor"`` of device 0 (cuda.core, else nvidia-smi)."""
    from iirp.kernels.cuda_build import CudaUnavailableError, gpu_identity

    try:
        identity = gpu_identity(0)
        return identity["gpu_name"], identity["compute_capability"]
    except CudaUnavailableError:  # no cuda.core here: ask the driver's tool
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader", "-i", "0"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout.strip()
            name, _, cap = out.partition(",")
            return name.strip(), cap.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown", "unknown"


def _network_flags() -> int:
    import tensorrt as trt

    major = int(str(trt.__version__).split(".")[0])
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if major >= 11 or flag is None:  # 11.x: always strongly typed, the flag is deprecated and ignored
        return 0
    return 1 << int(flag)


def _build_one(
    logger: "trt.ILogger", cache: Optional["trt.ITimingCache"], cache_bytes: bytes,
    onnx_path: Path, stage: StageSpec, manifest: Manifest,
) -> tuple[bytes, "trt.ITimingCache"]:
    """Parse one ONNX file and build its engine; returns the plan and the (shared) timing cache."""
    import tensorrt as trt

    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if manifest.precision == "fp32" and tf32 is not None:
        config.clear_flag(tf32)  # TF32 convolutions would break fp32 parity (~1e-3 relative)
    if cache is None:
        cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    profile = builder.create_optimization_profile()
    for spec in stage.inputs:
        lo, opt, hi = profile_shapes(spec, manifest)
        profile.set_shape(spec.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path.name} (see the log above)")
    return bytes(serialized), cache


def build_engines(folder: Path, manifest: Manifest, *, previous: Optional[Path] = None) -> Manifest:
    """Build one serialized engine per stage next to its ONNX file; record them in ``manifest``.

    Args:
        folder: the export folder holding the ONNX files (engines and ``timing.cache`` go there).
        manifest: the export's manifest; its stages gain ``engine_file``/``engine_sha256`` and
            ``manifest.tensorrt`` gets the GPU name, compute capability, TensorRT version and cache.
        previous: a folder whose ``timing.cache`` to start from (an earlier export), if any.

    Returns:
        ``manifest``, updated in place.

    Raises:
        EngineBuildError: TensorRT missing, a parse or build failure.
    """
    require_tensorrt()
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    cache_bytes = b""
    for candidate in (folder / TIMING_CACHE, (previous / TIMING_CACHE) if previous else None):
        if candidate is not None and candidate.is_file():
            cache_bytes = candidate.read_bytes()
            break
    cache: Optional[trt.ITimingCache] = None
    for name, stage in list(manifest.stages.items()):
        engine_bytes, cache = _build_one(logger, cache, cache_bytes, folder / stage.file, stage, manifest)
        engine_file = Path(stage.file).stem + ENGINE_SUFFIX
        (folder / engine_file).write_bytes(engine_bytes)
        manifest.stages[name] = StageSpec(
            file=stage.file, sha256=stage.sha256, inputs=stage.inputs, outputs=stage.outputs,
            engine_file=engine_file, engine_sha256=sha256_file(folder / engine_file),
        )
    if cache is not None:
        write_bytes(folder / TIMING_CACHE, bytes(cache.serialize()))
    gpu_name, capability = _gpu()
    manifest.tensorrt = {
        "gpu_name": gpu_name,
        "compute_capability": capability,
        "tensorrt_version": str(trt.__version__),
        "timing_cache": TIMING_CACHE,
        "strongly_typed": True,
    }
    return manifest
