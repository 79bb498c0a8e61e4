"""The GPU pipeline (:mod:`iirp.runtime.gpu_pipeline`).

Without a GPU: import guards (no torch, no SimpleITK), argument checks, the
one-line CLI error for ``--device cuda``, and the host adapter of the torch
stages against the PyTorch reference on a tiny random network.

With a GPU (marker ``gpu``): the GPU pipeline against the CPU pipeline (numba
kernels, same weights) on the LPBA40 pair S05 <- S20 prepared by
``benchmarks/prepare_device_inputs.py`` (``benchmarks/device_inputs``, or the
folder in ``IIRP_DEVICE_INPUTS``): same iterations, flow within 1e-3 voxel in fp32.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from iirp.errors import IirpError
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

BLOCK = "import sys\nfor name in ('torch', 'SimpleITK'):\n    sys.modules[name] = None\n"


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# --------------------------------------------------------------------------- no GPU needed


def test_imports_without_torch_and_simpleitk() -> None:
    code = BLOCK + (
        "import iirp.runtime, iirp.runtime.pipeline, iirp.runtime.gpu_pipeline, iirp.runtime.solvers\n"
        "from iirp.runtime import make_solver\n"
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


@pytest.mark.parametrize("device", ["cpu", "tpu", "cuda:x", "cudaa"])
def test_cuda_device_rejects_other_devices(device: str) -> None:
    from iirp.runtime.gpu_pipeline import cuda_device

    with pytest.raises(ValueError, match=r"f\(\) 'device' must be 'cuda' or 'cuda:N', got"):
        cuda_device("f()", device)


def test_torch_stages_precision_checks() -> None:
    pytest.importorskip("torch")
    from iirp.runtime.gpu_pipeline import TorchStages

    with pytest.raises(ValueError, match=r"TorchStages\(\) 'precision' must be one of fp32, fp16, got 'bf16'"):
        TorchStages("unused.pt", "cpu", "bf16")
    with pytest.raises(ValueError, match=r"TorchStages\(\) 'precision' fp16 needs a CUDA device, got device 'cpu'"):
        TorchStages("unused.pt", "cpu", "fp16")


@pytest.mark.skipif(_has_cuda(), reason="checks the no-GPU error")
def test_make_solver_cuda_without_gpu() -> None:
    from iirp.runtime import make_solver

    with pytest.raises(CudaUnavailableError, match=r"make_solver\(\) 'device' 'cuda' requested but|needs PyTorch"):
        make_solver("torch", checkpoint="unused.pt", device="cuda")


def test_make_solver_bad_device() -> None:
    from iirp.runtime import make_solver

    with pytest.raises(IirpError, match=r"make_solver\(\): device must be 'cpu' or 'cuda\[:N\]', got 'cuda:one'"):
        make_solver("torch", checkpoint="unused.pt", device="cuda:one")


@pytest.mark.skipif(_has_cuda(), reason="checks the no-GPU error")
def test_cli_device_cuda_without_gpu_is_one_line(tmp_path: Path) -> None:
    testing = pytest.importorskip("typer.testing")
    from iirp.cli import run_app

    out = tmp_path / "out"
    args = ["fixed.nii.gz", "moving.nii.gz", "--checkpoint", "unused.pt", "-o", str(out), "--device", "cuda"]
    result = testing.CliRunner().invoke(run_app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    try:
        err = result.stderr
    except ValueError:  # older click mixes stderr into output
        err = result.output
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("iirp-run") and "cuda" in lines[0], lines[0]
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """CPU :class:`TorchStages` of a random 32^3 RP-Net and a blob pair ``(X, Y, Z)`` float32."""
    torch = pytest.importorskip("torch")
    from iirp.model import RPNet
    from iirp.runtime.gpu_pipeline import TorchStages

    size = (32, 32, 32)
    torch.manual_seed(0)
    ckpt = tmp_path_factory.mktemp("gpu_pipeline") / "tiny.pt"
    config = {"size": size, "in_channel": 1, "first_channel": 8}
    torch.save({"config": config, "model_state": RPNet(size=size).state_dict()}, ckpt)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in size], indexing="ij"))
    centre = np.array([14.0, 17.0, 15.0], np.float32)[:, None, None, None]
    fixed = np.exp(-((grid - 15.5) ** 2).sum(0) / 50.0).astype(np.float32)
    moving = np.exp(-((grid - centre) ** 2).sum(0) / 50.0).astype(np.float32)
    return {"stages": TorchStages(ckpt, "cpu", "fp32"), "moving": moving, "fixed": fixed}


def test_host_stages_match_reference(tiny_pair: dict[str, Any]) -> None:
    """The torch stages behind the engine ``infer`` contract drive the CPU pipeline like the reference."""
    from iirp.model import register_arrays
    from iirp.runtime.pipeline import register_arrays_with_engines

    stages, moving, fixed = tiny_pair["stages"], tiny_pair["moving"], tiny_pair["fixed"]
    size = moving.shape
    rule = parse_iterstop("fixed:1,1,1,1")
    trace = register_arrays_with_engines(stages.engine_stages(), moving, fixed, rule)
    reference = register_arrays(stages.net, moving, fixed, rule)
    assert trace.flow.shape == (3, *size) and trace.flow.dtype == np.float32
    assert trace.iterations == reference.iterations
    np.testing.assert_allclose(trace.flow, reference.flow, atol=1e-4)


class _HostKernels:
    """Stand-in for :mod:`iirp.kernels.cuda_ops` on CPU torch tensors: the numba kernels, same signatures."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch

    def _call(self, func: Any, *args: Any) -> Any:
        return self.torch.from_numpy(func(*(a.numpy() if hasattr(a, "numpy") else a for a in args)))

    def warp(self, src: Any, flow: Any) -> Any:
        from iirp import kernels

        assert src.is_contiguous() and flow.is_contiguous() and flow.dtype == self.torch.float32
        return self._call(kernels.warp, src, flow)

    def compose(self, phi: Any, du: Any) -> Any:
        from iirp import kernels

        assert phi.is_contiguous() and du.is_contiguous()
        return self._call(kernels.compose, phi, du)

    def upsample2(self, flow: Any) -> Any:
        from iirp import kernels

        return self._call(kernels.upsample2, flow)

    def fused_ncc_score(self, moving: Any, fixed: Any, flow: Any, factor: int) -> float:
        from iirp import kernels

        assert flow.is_contiguous() and flow.shape[0] == 3
        return kernels.fused_ncc_score(moving.numpy(), fixed.numpy(), flow.numpy(), factor)


def test_cuda_level_ops_glue_on_cpu(tiny_pair: dict[str, Any]) -> None:
    """CudaLevelOps with the numba kernels standing in for the CUDA ones reproduces the CPU pipeline exactly."""
    torch = pytest.importorskip("torch")
    from iirp.iterstop import run_iterstop
    from iirp.runtime.gpu_pipeline import CudaLevelOps
    from iirp.runtime.pipeline import register_arrays_with_engines

    stages, moving, fixed = tiny_pair["stages"], tiny_pair["moving"], tiny_pair["fixed"]
    for spec in ("official", "paper", "fixed:2,1,1,1"):
        rule = parse_iterstop(spec, delta=0.0, max_iters=3)  # delta 0: every level runs up to the cap
        ops = CudaLevelOps(stages, torch.from_numpy(moving), torch.from_numpy(fixed))
        ops.ops = _HostKernels(torch)
        trace = run_iterstop(ops, rule)
        expected = register_arrays_with_engines(stages.engine_stages(), moving, fixed, rule)
        assert trace.iterations == expected.iterations and trace.scores == expected.scores, spec
        assert trace.flow.dtype == torch.float32 and tuple(trace.flow.shape) == expected.flow.shape
        np.testing.assert_array_equal(trace.flow.numpy(), expected.flow)


# --------------------------------------------------------------------------- GPU


@pytest.fixture(scope="module")
def lpba(cuda_torch: Any) -> dict[str, Any]:
    """The prepared LPBA40 pair (``benchmarks/prepare_device_inputs.py``); skips when absent."""
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
    from iirp.runtime.gpu_pipeline import TorchStages
    from iirp.runtime.pipeline import register_arrays_with_engines

    stages = TorchStages(lpba["ckpt"], "cpu", "fp32")
    return register_arrays_with_engines(stages.engine_stages(), lpba["moving"], lpba["fixed"], parse_iterstop("official"))


@pytest.fixture(scope="module")
def gpu_fp32(lpba: dict[str, Any]) -> Any:
    from iirp.runtime.gpu_pipeline import CudaSolver

    return CudaSolver(lpba["ckpt"], "cuda", "fp32").solve(lpba["moving"], lpba["fixed"], parse_iterstop("official"))


def _warped_labels(torch: Any, labels: np.ndarray, flow: np.ndarray) -> np.ndarray:
    from iirp.kernels import cuda_ops

    out = cuda_ops.warp_labels(torch.from_numpy(labels).cuda(), torch.from_numpy(flow).cuda())
    return out.cpu().numpy()


@pytest.mark.gpu
def test_gpu_fp32_matches_cpu_pipeline(gpu_fp32: Any, cpu_trace: Any) -> None:
    assert gpu_fp32.flow.shape == cpu_trace.flow.shape and gpu_fp32.flow.dtype == np.float32
    assert gpu_fp32.iterations == cpu_trace.iterations
    assert gpu_fp32.estimator_passes == cpu_trace.estimator_passes
    for gpu_scores, cpu_scores in zip(gpu_fp32.scores, cpu_trace.scores):
        np.testing.assert_allclose(gpu_scores, cpu_scores, atol=SCORE_ATOL_FP32)
    assert float(np.abs(gpu_fp32.flow - cpu_trace.flow).max()) <= FLOW_ATOL_FP32


@pytest.mark.gpu
def test_gpu_timings_recorded(gpu_fp32: Any) -> None:
    t = gpu_fp32.timings_ms
    for key in ("features", "estimator_4", "estimator_1", "kernels", "score", "iirp", "upload", "download", "solve"):
        assert key in t and t[key] >= 0.0, (key, t)


@pytest.mark.gpu
def test_gpu_fp16_close_to_fp32(cuda_torch: Any, lpba: dict[str, Any], gpu_fp32: Any) -> None:
    from iirp.runtime.gpu_pipeline import CudaSolver

    trace = CudaSolver(lpba["ckpt"], "cuda", "fp16").solve(lpba["moving"], lpba["fixed"], parse_iterstop("official"))
    assert trace.flow.dtype == np.float32 and np.isfinite(trace.flow).all()
    labels = np.intersect1d(np.unique(lpba["fixed_seg"]), np.unique(lpba["moving_seg"]))
    labels = labels[labels > 0]
    dice16 = mean_dice_arrays(lpba["fixed_seg"], _warped_labels(cuda_torch, lpba["moving_seg"], trace.flow), labels)
    dice32 = mean_dice_arrays(lpba["fixed_seg"], _warped_labels(cuda_torch, lpba["moving_seg"], gpu_fp32.flow), labels)
    assert abs(dice16 - dice32) <= DICE_ATOL_FP16, (dice16, dice32)


@pytest.mark.gpu
def test_make_solver_cuda_is_gpu_pipeline(lpba: dict[str, Any]) -> None:
    from iirp.runtime import make_solver
    from iirp.runtime.gpu_pipeline import CudaSolver

    solver = make_solver("torch", checkpoint=lpba["ckpt"], device="cuda")
    assert isinstance(solver, CudaSolver) and solver.device.startswith("cuda") and solver.model_size == (160, 192, 160)
