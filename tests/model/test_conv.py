"""The RP-Net convolution (iirp.model.rpnet._Conv3d) is nn.Conv3d, forward and backward, on every path."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch.nn import functional as F  # noqa: E402

from iirp.model.rpnet import _ATEN_NATIVE_CONV_LIMIT, _Conv3d  # noqa: E402


@pytest.mark.parametrize(
    "shape, cin",
    [((32, 32, 32), 16), ((7, 9, 5), 16), ((2, 3, 4), 1), ((1, 4, 4), 8), ((33, 8, 8), 3), ((20, 24, 20), 64)],
)
def test_split_convolution_equals_conv3d(shape: tuple[int, int, int], cin: int) -> None:
    gen = torch.Generator().manual_seed(0)
    conv = _Conv3d(cin, 8, 3, padding=1)
    x = torch.randn(1, cin, *shape, generator=gen, requires_grad=True)
    y = conv(x)
    ref = F.conv3d(x, conv.weight, conv.bias, padding=1)
    assert y.shape == ref.shape
    scale = float(ref.abs().max())
    assert float((y - ref).abs().max()) <= 1e-5 * scale
    g = torch.randn(y.shape, generator=gen)
    got = torch.autograd.grad(y, (x, conv.weight, conv.bias), g)
    want = torch.autograd.grad(ref, (x, conv.weight, conv.bias), g)
    for a, b in zip(got, want):
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


def test_small_inputs_take_the_onednn_path() -> None:
    """The case ATen would send to slow_conv3d runs as a batch of two halves (oneDNN)."""
    conv = _Conv3d(16, 16, 3, padding=1)
    x = torch.rand(1, 16, 32, 32, 32)
    assert 16 * 32 * 32 <= _ATEN_NATIVE_CONV_LIMIT
    from torch.profiler import profile

    with torch.no_grad(), profile() as prof:
        conv(x)
    names = {e.key for e in prof.key_averages()}
    assert "aten::mkldnn_convolution" in names and "aten::slow_conv3d_forward" not in names


def test_tracing_sees_the_plain_convolution() -> None:
    conv = _Conv3d(8, 8, 3, padding=1).eval()
    traced = torch.jit.trace(conv, torch.rand(1, 8, 16, 16, 16))
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "aten::_convolution" in kinds and "aten::cat" not in kinds and "aten::pad" not in kinds
