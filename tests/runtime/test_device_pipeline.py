"""The one pipeline (:mod:`iirp.runtime.pipeline`) on every placement.

Without a GPU: import guards (no torch, no SimpleITK), the device parser, the one-line errors for a
missing GPU, and the host pipeline with each stage backend (onnxruntime, torch) against the PyTorch
reference on a tiny random network. (tests/runtime/test_trt_backend.py runs the device code path on
host memory with the CUDA kernels' host builds.)

With a GPU (marker ``gpu``): the CUDA placement (CuPy arrays, the CUDA kernels, torch stages on
cuDNN) against the CPU pipeline on the LPBA40 pair S05 <- S20 prepared by
``benchmarks/prepare_device_inputs.py`` (``benchmarks/device_inputs``, or the folder in
``IIRP_DEVICE_INPUTS``): same iterations, flow within 1e-3 voxel in fp32; fp16 Dice close to fp32.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import tiny_export

from iirp.devices import CPU, Device, DeviceError, parse_device
from iirp.iterstop import parse_iterstop
from iirp.kernels.cuda_build import CudaUnavailableError
from iirp.metrics import mean_dice_arrays

REPO = Path(__file__).resolve().parents[2]
DEVICE_INPUTS = Path(os.environ.get("IIRP_DEVICE_INPUTS", REPO / "benchmarks" / "device_inputs"))
#: fp32 GPU vs CPU pipeline: largest flow difference allowed (voxels), and score difference.
FLOW_ATOL_FP32 = 1e-3
SCORE_ATOL_FP32 = 1e-5
#: fp16 network: mean Dice may move this much from the fp32 GPU result.
DICE_ATOL_FP16 = 0.01
#: Host pipeline vs the PyTorch reference (numba kernels vs grid_sample: float32 rounding only).
FLOW_ATOL_HOST = 1e-4

BLOCK = "import sys\nfor name in ('torch', 'SimpleITK'):\n    sys.modules[name] = None\n"


def _has_gpu() -> bool:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:  # noqa: BLE001 - no CuPy, no driver
        return False


# --------------------------------------------------------------------------- no GPU needed


def test_imports_without_torch_and_simpleitk() -> None:
    code = BLOCK + (
        "import iirp.runtime, iirp.runtime.pipeline, iirp.runtime.placement, iirp.runtime.solvers\n"
        "import iirp.runtime.engines, iirp.devices\n"
        "from iirp.runtime import make_solver, EngineSolver\n"
        "assert sys.modules['torch'] is None and sys.modules['SimpleITK'] is None\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_simpleitk_names_still_resolve() -> None:
    pytest.importorskip("SimpleITK")
    import iirp.runtime as runtime
    from iirp.runtime.register import register_files

    assert runtime.register_files is register_files
    with pytest.raises(AttributeError, match="has no attribute 'nonesuch'"):
        runtime.nonesuch  # noqa: B018


@pytest.mark.parametrize(("text", "device"), [
    ("cpu", CPU), ("CPU", CPU), ("cuda", Device("cuda", 0)), ("cuda:0", Device("cuda", 0)),
    (" cuda:3 ", Device("cuda", 3)), (Device("cuda", 1), Device("cuda", 1)),
])
def test_parse_device(text: Any, device: Device) -> None:
    assert parse_device(text) == device
    assert str(parse_device(text)) == ("cpu" if device.kind == "cpu" else f"cuda:{device.index}")


@pytest.mark.parametrize("text", ["tpu", "cuda:x", "cudaa", "cuda:", "gpu", "", None, 0, "cuda:-1"])
def test_parse_device_rejects(text: Any) -> None:
    with pytest.raises(DeviceError, match=r"--device must be 'cpu' or 'cuda\[:N\]', got"):
        parse_device(text, "--device")


@pytest.mark.skipif(_has_gpu(), reason="checks the no-GPU error")
@pytest.mark.parametrize("engine", ["torch", "reference"])
def test_make_solver_cuda_without_gpu(engine: str) -> None:
    from iirp.errors import IirpError
    from iirp.runtime import make_solver

    error = CudaUnavailableError if engine == "torch" else IirpError
    with pytest.raises(error, match=r"device cuda:0 (needs CuPy|requested but)"):
        make_solver(engine, checkpoint="unused.pt", device="cuda")


@pytest.mark.skipif(_has_gpu(), reason="checks the no-GPU error")
def test_cli_device_cuda_without_gpu_is_one_line(tmp_path: Path) -> None:
    """A missing GPU is one line, before the images or the model are read (they do not exist here)."""
    testing = pytest.importorskip("typer.testing")
    from iirp.cli import run_app

    out = tmp_path / "out"
    args = ["fixed.nii.gz", "moving.nii.gz", "--checkpoint", "unused.pt", "-o", str(out), "--engine", "torch",
            "--device", "cuda"]
    result = testing.CliRunner().invoke(run_app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("iirp-run: error: device cuda:0"), lines
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A random 32^3 RP-Net, its export, and a blob pair ``(X, Y, Z)`` float32 in [0, 1]."""
    pytest.importorskip("torch")
    data, engines = tiny_export(tmp_path_factory.mktemp("device_pipeline"))
    size = (32, 32, 32)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in size], indexing="ij"))
    centre = np.array([14.0, 17.0, 15.0], np.float32)[:, None, None, None]
    fixed = np.exp(-((grid - 15.5) ** 2).sum(0) / 50.0).astype(np.float32)
    moving = np.exp(-((grid - centre) ** 2).sum(0) / 50.0).astype(np.float32)
    return {"ckpt": data["ckpt"], "engines": engines, "moving": moving, "fixed": fixed}


@pytest.mark.parametrize("rule", ["official", "paper", "fixed:2,1,1,1"])
def test_every_stage_backend_drives_one_pipeline(tiny: dict[str, Any], rule: str) -> None:
    """onnxruntime stages, torch stages from the export's source, torch stages straight from the checkpoint:
    one LevelOps, the same iterations and flows as the PyTorch reference loop."""
    from iirp.runtime import make_solver

    iterstop = parse_iterstop(rule, delta=0.0, max_iters=3)  # delta 0: every level runs up to the cap
    reference = make_solver("reference", checkpoint=tiny["ckpt"]).solve(tiny["moving"], tiny["fixed"], iterstop)
    solvers = {
        "ort": make_solver("ort", engines=tiny["engines"]),
        "torch (export source)": make_solver("torch", engines=tiny["engines"]),
        "torch (checkpoint)": make_solver("torch", checkpoint=tiny["ckpt"]),
    }
    flows = {}
    for name, solver in solvers.items():
        trace = solver.solve(tiny["moving"], tiny["fixed"], iterstop)
        assert trace.iterations == reference.iterations, name
        assert trace.flow.shape == (3, 32, 32, 32) and trace.flow.dtype == np.float32, name
        np.testing.assert_allclose(trace.flow, reference.flow, atol=FLOW_ATOL_HOST, err_msg=name)
        assert {"upload", "features", "download", "iirp"} <= set(trace.timings_ms), name
        flows[name] = trace.flow
    # the same torch modules behind the same pipeline: bit for bit, whatever the source
    np.testing.assert_array_equal(flows["torch (export source)"], flows["torch (checkpoint)"])


def test_torch_stages_from_a_checkpoint_report_its_contract(tiny: dict[str, Any]) -> None:
    from iirp.runtime import EngineSolver
    from iirp.runtime.engines.options import BackendOptionError, BackendOptions

    solver = EngineSolver.from_checkpoint(tiny["ckpt"])
    assert (solver.engine, solver.device, solver.precision) == ("torch", "cpu", "fp32")
    assert solver.contract.size == (32, 32, 32) and solver.contract.spacing == (1.0, 1.0, 1.0)
    assert not solver.contract.recorded  # the tiny checkpoint records no grid: 1 mm unless told
    with pytest.raises(BackendOptionError, match="engine 'torch' computes fp32 or fp16"):
        EngineSolver.from_checkpoint(tiny["ckpt"], options=BackendOptions(precision="bf16"))
    with pytest.raises(Exception, match="fp16 only on a CUDA device"):
        EngineSolver.from_checkpoint(tiny["ckpt"], options=BackendOptions(precision="fp16")).load()


# --------------------------------------------------------------------------- GPU


@pytest.fixture(scope="module")
def lpba() -> dict[str, Any]:
    """The prepared LPBA40 pair (``benchmarks/prepare_device_inputs.py``); skips without a GPU or the pair."""
    if not _has_gpu():
        pytest.skip("no CUDA device (or no CuPy)")
    npz = DEVICE_INPUTS / "lpba40_pair.npz"
    if not npz.is_file():
        pytest.skip(f"{npz} not found: run benchmarks/prepare_device_inputs.py (or set IIRP_DEVICE_INPUTS)")
    with np.load(npz) as data:
        pair = {k: data[k] for k in data.files}
    pair["ckpt"] = DEVICE_INPUTS / "mind.pt"
    return pair


@pytest.fixture(scope="module")
def cpu_trace(lpba: dict[str, Any]) -> Any:
    """The CPU pipeline (numba kernels, torch stages on the CPU) on the pair, ``official``."""
    from iirp.runtime import EngineSolver

    return EngineSolver.from_checkpoint(lpba["ckpt"]).solve(lpba["moving"], lpba["fixed"], parse_iterstop("official"))


@pytest.fixture(scope="module")
def gpu_fp32(lpba: dict[str, Any]) -> Any:
    from iirp.runtime import EngineSolver

    solver = EngineSolver.from_checkpoint(lpba["ckpt"], "cuda")
    return solver.solve(lpba["moving"], lpba["fixed"], parse_iterstop("official"))


def _warped_labels(labels: np.ndarray, flow: np.ndarray) -> np.ndarray:
    import cupy

    from iirp.kernels import cuda_ops

    return cupy.asnumpy(cuda_ops.warp_labels(cupy.asarray(labels), cupy.asarray(flow)))


@pytest.mark.gpu
def test_gpu_fp32_matches_cpu_pipeline(gpu_fp32: Any, cpu_trace: Any) -> None:
    assert gpu_fp32.flow.shape == cpu_trace.flow.shape and gpu_fp32.flow.dtype == np.float32
    assert isinstance(gpu_fp32.flow, np.ndarray)  # came down once, as a host array
    assert gpu_fp32.iterations == cpu_trace.iterations
    assert gpu_fp32.estimator_passes == cpu_trace.estimator_passes
    for gpu_scores, cpu_scores in zip(gpu_fp32.scores, cpu_trace.scores):
        np.testing.assert_allclose(gpu_scores, cpu_scores, atol=SCORE_ATOL_FP32)
    assert float(np.abs(gpu_fp32.flow - cpu_trace.flow).max()) <= FLOW_ATOL_FP32


@pytest.mark.gpu
def test_gpu_timings_recorded(gpu_fp32: Any) -> None:
    t = gpu_fp32.timings_ms
    for key in ("features", "estimator_4", "estimator_1", "kernels", "score", "iirp", "upload", "download"):
        assert key in t and t[key] >= 0.0, (key, t)


@pytest.mark.gpu
def test_gpu_fp16_close_to_fp32(lpba: dict[str, Any], gpu_fp32: Any) -> None:
    from iirp.runtime import EngineSolver
    from iirp.runtime.engines.options import BackendOptions

    solver = EngineSolver.from_checkpoint(lpba["ckpt"], "cuda", BackendOptions(precision="fp16"))
    trace = solver.solve(lpba["moving"], lpba["fixed"], parse_iterstop("official"))
    assert solver.precision == "fp16" and trace.flow.dtype == np.float32 and np.isfinite(trace.flow).all()
    labels = np.intersect1d(np.unique(lpba["fixed_seg"]), np.unique(lpba["moving_seg"]))
    labels = labels[labels > 0]
    dice16 = mean_dice_arrays(lpba["fixed_seg"], _warped_labels(lpba["moving_seg"], trace.flow), labels)
    dice32 = mean_dice_arrays(lpba["fixed_seg"], _warped_labels(lpba["moving_seg"], gpu_fp32.flow), labels)
    assert abs(dice16 - dice32) <= DICE_ATOL_FP16, (dice16, dice32)


@pytest.mark.gpu
def test_make_solver_cuda_is_the_device_pipeline(lpba: dict[str, Any]) -> None:
    from iirp.runtime import EngineSolver, make_solver
    from iirp.runtime.placement import CudaPlacement

    solver = make_solver("torch", checkpoint=lpba["ckpt"], device="cuda")
    assert isinstance(solver, EngineSolver) and isinstance(solver.placement, CudaPlacement)
    assert solver.device == "cuda:0" and solver.model_size == (160, 192, 160)
