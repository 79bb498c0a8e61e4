"""Argument checks of :mod:`iirp.kernels.cuda_ops`, on stand-in device arrays (no GPU needed).

The stand-ins expose ``__cuda_array_interface__`` with made-up addresses; every
case here fails validation before anything reaches the GPU.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import pytest

from iirp.kernels import cuda_ops


class FakeCuda:
    """Minimal ``__cuda_array_interface__`` (v3) producer at a made-up address."""

    def __init__(self, shape: tuple[int, ...], dtype: Any = np.float32, ptr: int = 1 << 20,
                 strides: Optional[tuple[int, ...]] = None, readonly: bool = False, device: Optional[int] = None):
        self.__cuda_array_interface__ = {
            "shape": shape, "typestr": np.dtype(dtype).str, "data": (ptr, readonly), "strides": strides, "version": 3,
        }
        if device is not None:
            self.device = SimpleNamespace(id=device)


SHAPE = (5, 6, 7)
FLOW = (3, *SHAPE)


def _far(k: int) -> int:
    """An address far from the others so that stand-ins do not overlap."""
    return (k + 1) << 30


def test_host_arrays_are_refused() -> None:
    with pytest.raises(TypeError, match=r"warp\(\) 'src' must be a CUDA device array with __cuda_array_interface__"):
        cuda_ops.warp(np.zeros(SHAPE, np.float32), FakeCuda(FLOW))


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.bool_])
def test_src_dtype(dtype: Any) -> None:
    with pytest.raises(TypeError, match=rf"warp\(\) 'src' must have dtype float32 or float16, got {np.dtype(dtype)}"):
        cuda_ops.warp(FakeCuda(SHAPE, dtype), FakeCuda(FLOW, ptr=_far(1)))


def test_flow_dtype_must_be_float32() -> None:
    with pytest.raises(TypeError, match=r"warp\(\) 'flow' must have dtype float32, got float16"):
        cuda_ops.warp(FakeCuda(SHAPE), FakeCuda(FLOW, np.float16, ptr=_far(1)))


def test_flow_shape() -> None:
    with pytest.raises(ValueError, match=r"warp\(\) 'flow' must have shape \(3, 5, 6, 7\), got \(2, 5, 6, 7\)"):
        cuda_ops.warp(FakeCuda(SHAPE), FakeCuda((2, *SHAPE), ptr=_far(1)))


def test_src_ndim() -> None:
    with pytest.raises(ValueError, match=r"warp\(\) 'src' must have shape \(X, Y, Z\) or \(C, X, Y, Z\), got \(5, 6\)"):
        cuda_ops.warp(FakeCuda((5, 6)), FakeCuda(FLOW, ptr=_far(1)))


def test_non_contiguous_is_refused() -> None:
    strides = (4, 20, 120)  # Fortran order
    with pytest.raises(ValueError, match=r"warp\(\) 'src' must be C-contiguous, got strides \(4, 20, 120\)"):
        cuda_ops.warp(FakeCuda(SHAPE, strides=strides), FakeCuda(FLOW, ptr=_far(1)))


def test_explicit_c_strides_are_accepted_with_unit_axes() -> None:
    assert cuda_ops._is_c_contiguous((5, 1, 7), (28, 999, 4), 4)
    assert cuda_ops._is_c_contiguous((5, 6, 7), (168, 28, 4), 4)
    assert not cuda_ops._is_c_contiguous((5, 6, 7), (168, 28, 8), 4)


def test_out_dtype_and_shape() -> None:
    src, flow = FakeCuda(SHAPE), FakeCuda(FLOW, ptr=_far(1))
    with pytest.raises(TypeError, match=r"warp\(\) 'out' must have dtype float32, got float16"):
        cuda_ops.warp(src, flow, out=FakeCuda(SHAPE, np.float16, ptr=_far(2)))
    with pytest.raises(ValueError, match=r"warp\(\) 'out' must have shape \(5, 6, 7\), got \(5, 6, 8\)"):
        cuda_ops.warp(src, flow, out=FakeCuda((5, 6, 8), ptr=_far(2)))


def test_out_must_not_overlap() -> None:
    src, flow = FakeCuda(SHAPE), FakeCuda(FLOW, ptr=_far(1))
    with pytest.raises(ValueError, match=r"warp\(\) 'out' must not overlap 'src'"):
        cuda_ops.warp(src, flow, out=FakeCuda(SHAPE, ptr=(1 << 20) + 64))
    with pytest.raises(ValueError, match=r"compose\(\) 'out' must not overlap 'du'"):
        cuda_ops.compose(FakeCuda(FLOW), FakeCuda(FLOW, ptr=_far(1)), out=FakeCuda(FLOW, ptr=_far(1)))


def test_out_must_be_writeable() -> None:
    with pytest.raises(ValueError, match=r"warp\(\) 'out' must be writeable"):
        cuda_ops.warp(FakeCuda(SHAPE), FakeCuda(FLOW, ptr=_far(1)), out=FakeCuda(SHAPE, ptr=_far(2), readonly=True))


def test_out_is_required_for_other_libraries() -> None:
    with pytest.raises(TypeError, match=r"warp\(\) 'out' is required for FakeCuda inputs"):
        cuda_ops.warp(FakeCuda(SHAPE), FakeCuda(FLOW, ptr=_far(1)))


def test_arrays_on_two_devices() -> None:
    with pytest.raises(ValueError, match=r"compose\(\) arrays must be on one device, got 'phi' on cuda:0, 'du' on cuda:1"):
        cuda_ops.compose(FakeCuda(FLOW, device=0), FakeCuda(FLOW, ptr=_far(1), device=1))


def test_compose_shapes() -> None:
    with pytest.raises(ValueError, match=r"compose\(\) 'phi' must have shape \(3, 5, 6, 7\), got \(2, 5, 6, 7\)"):
        cuda_ops.compose(FakeCuda((2, *SHAPE)), FakeCuda((2, *SHAPE), ptr=_far(1)))
    with pytest.raises(ValueError, match=r"compose\(\) 'du' must have shape \(3, 5, 6, 7\), got \(3, 5, 6, 8\)"):
        cuda_ops.compose(FakeCuda(FLOW), FakeCuda((3, 5, 6, 8), ptr=_far(1)))


@pytest.mark.parametrize(("factor", "error", "message"), [
    (0, ValueError, r"upsample\(\) 'factor' must be a positive integer, got 0"),
    (2.5, TypeError, r"upsample\(\) 'factor' must be a positive integer, got 2.5"),
    (True, TypeError, r"upsample\(\) 'factor' must be a positive integer, got True"),
])
def test_upsample_factor(factor: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        cuda_ops.upsample(FakeCuda(FLOW), factor)


def test_upsample_flow_shape() -> None:
    with pytest.raises(ValueError, match=r"upsample\(\) 'flow' must have shape \(3, x, y, z\), got \(5, 6, 7\)"):
        cuda_ops.upsample(FakeCuda(SHAPE), 2)
    with pytest.raises(ValueError, match=r"upsample\(\) 'out' must have shape \(3, 10, 12, 14\), got \(3, 5, 6, 7\)"):
        cuda_ops.upsample2(FakeCuda(FLOW), out=FakeCuda(FLOW, ptr=_far(1)))


def test_too_many_voxels() -> None:
    shape = (1 << 11, 1 << 10, 1 << 10)
    with pytest.raises(ValueError, match=r"warp\(\) 'src' has 2147483648 voxels per channel, more than"):
        cuda_ops.warp(FakeCuda(shape), FakeCuda((3, *shape), ptr=1 << 45))


def test_labels_dtype_and_shape() -> None:
    with pytest.raises(TypeError, match=r"warp_labels\(\) 'labels' must have dtype int32 or int16 or uint8, got float32"):
        cuda_ops.warp_labels(FakeCuda(SHAPE), FakeCuda(FLOW, ptr=_far(1)))
    with pytest.raises(ValueError, match=r"warp_labels\(\) 'labels' must have shape \(X, Y, Z\), got \(1, 5, 6, 7\)"):
        cuda_ops.warp_labels(FakeCuda((1, *SHAPE), np.int32), FakeCuda(FLOW, ptr=_far(1)))


def test_score_checks() -> None:
    moving, fixed = FakeCuda((8, 6, 4)), FakeCuda((8, 6, 4), ptr=_far(1))
    with pytest.raises(ValueError, match=r"fused_ncc_score\(\) 'moving' shape \(8, 6, 4\) must be divisible by 'factor' 4"):
        cuda_ops.fused_ncc_score(moving, fixed, FakeCuda((3, 2, 1, 1), ptr=_far(2)), 4)
    with pytest.raises(ValueError, match=r"fused_ncc_score\(\) 'flow' must have shape \(3, 4, 3, 2\), got \(3, 4, 3, 3\)"):
        cuda_ops.fused_ncc_score(moving, fixed, FakeCuda((3, 4, 3, 3), ptr=_far(2)), 2)
    with pytest.raises(ValueError, match=r"fused_ncc_score\(\) 'fixed' must have shape \(8, 6, 4\), got \(8, 6, 5\)"):
        cuda_ops.fused_ncc_score(moving, FakeCuda((8, 6, 5), ptr=_far(1)), FakeCuda((3, 4, 3, 2), ptr=_far(2)), 2)
    with pytest.raises(ValueError, match=r"fused_ncc_score\(\) 'moving' needs at least 2 voxels, got shape \(1, 1, 1\)"):
        cuda_ops.fused_ncc_score(FakeCuda((1, 1, 1)), FakeCuda((1, 1, 1), ptr=_far(1)),
                                 FakeCuda((3, 1, 1, 1), ptr=_far(2)), 1)
    with pytest.raises(TypeError, match=r"fused_ncc_score\(\) 'fixed' must have dtype float32, got float16"):
        cuda_ops.fused_ncc_score(moving, FakeCuda((8, 6, 4), np.float16, ptr=_far(1)), FakeCuda((3, 4, 3, 2)), 2)


def test_bad_stream_type() -> None:
    pytest.importorskip("cuda.core")
    with pytest.raises(TypeError, match=r"warp\(\) 'stream' must be a torch/CuPy/cuda.core stream or an int handle"):
        cuda_ops.warp(FakeCuda(SHAPE), FakeCuda(FLOW, ptr=_far(1)), out=FakeCuda(SHAPE, ptr=_far(2)), stream="s")
