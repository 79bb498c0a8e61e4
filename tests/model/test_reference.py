"""The reference loop against RP-Net's own forward pass (SPEC 4) on a tiny random network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iirp.iterstop import parse_iterstop
from iirp.model import RPNet, TorchLevelOps, register_arrays, register_tensors
from iirp.model.spatial import ncc, upsample_flow, warp

SHAPE = (32, 24, 40)


@pytest.fixture(scope="module")
def net() -> RPNet:
    torch.manual_seed(0)
    model = RPNet(size=SHAPE).eval()
    with torch.no_grad():
        for p in model.parameters():  # small weights keep flows of a few voxels
            p.mul_(0.3)
    return model


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    base = torch.nn.functional.avg_pool3d(torch.rand(1, 1, *SHAPE, generator=g), 5, 1, 2)
    moving = torch.roll(base, shifts=(1, -1, 2), dims=(2, 3, 4))
    return moving, base


def test_rpnet_rule_equals_the_networks_forward(net: RPNet, pair) -> None:
    moving, fixed = pair
    with torch.inference_mode():
        expected = net(moving, fixed)
        trace = register_tensors(net, moving, fixed, parse_iterstop("rpnet"))
    assert trace.iterations == [1, 1, 1, 1] and trace.estimator_passes == 4
    assert trace.flow.shape == (1, 3, *SHAPE) and trace.flow.dtype == torch.float32
    assert torch.allclose(trace.flow, expected, atol=1e-5)
    assert float(expected.abs().max()) > 1e-2  # the network really moves something


def test_score_is_ncc_of_the_upsampled_warp(net: RPNet, pair) -> None:
    moving, fixed = pair
    with torch.inference_mode():
        ops = TorchLevelOps(net, moving, fixed)
        coarse = ops.estimate(3, None)
        expected = ncc(warp(moving, upsample_flow(coarse, SHAPE)), fixed)
        assert ops.score(3, coarse) == pytest.approx(expected, abs=1e-12)
        assert ops.score(1, ops.zero_flow(1)) == pytest.approx(ncc(moving, fixed), abs=1e-6)


def test_register_arrays_reports_every_score(net: RPNet, pair) -> None:
    moving, fixed = (t[0, 0].numpy() for t in pair)
    trace = register_arrays(net, moving, fixed, parse_iterstop("official", max_iters=3))
    assert trace.flow.shape == (3, *SHAPE) and trace.flow.dtype == np.float32
    assert all(0 <= n <= 3 for n in trace.iterations)
    # levels 3..1 score once per counted pass plus the stopping score (unless capped)
    for slot in (1, 2, 3):
        n, scores = trace.iterations[slot], trace.scores[slot]
        assert len(scores) == n + (0 if n == 3 else 1)
    stages = {"features", "kernels", "score"} | {f"estimator_{lv}" for lv in (1, 2, 3, 4)}
    assert set(trace.timings_ms) == stages | {"iirp"}
    # the stages are disjoint parts of the whole loop
    assert sum(trace.timings_ms[s] for s in stages) <= trace.timings_ms["iirp"]


def test_register_arrays_rejects_bad_shapes(net: RPNet) -> None:
    with pytest.raises(ValueError, match=r"register_arrays\(\) needs two equal"):
        register_arrays(net, np.zeros((30, 24, 40), np.float32), np.zeros((30, 24, 40), np.float32),
                        parse_iterstop("rpnet"))
