"""SPEC section 3 conventions of :mod:`iirp.model.spatial`, pinned on tiny hand-computed volumes.

All volumes are deliberately non-cubic (``(5, 6, 7)``) so that a swapped or
flipped axis cannot pass. Flow component c displaces along tensor axis 2 + c,
``warp(src, u)(p) = src(p + u(p))``, align_corners=True, zero padding.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from iirp.model.spatial import compose, identity_coords, ncc, upsample_flow, warp

SHAPE = (5, 6, 7)

#: float32 warp goes through normalised grid_sample coordinates; the
#: round trip i -> i * 2/(n-1) - 1 -> i costs up to ~1 ulp of the coordinate,
#: so "exact" cases are checked to this absolute tolerance on values in [0, 1].
WARP_ATOL = 1e-6
#: same, for the hand ramps whose values reach a few hundred.
RAMP_ATOL = 1e-4


# --------------------------------------------------------------------------- helpers


def _ramp(shape=SHAPE, dtype=torch.float32) -> torch.Tensor:
    """``(1, 1, X, Y, Z)`` volume with value ``100 i + 10 j + k``: every voxel distinct, axes readable."""
    i, j, k = torch.meshgrid(
        *[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"
    )
    return (100 * i + 10 * j + k).to(dtype)[None, None]


def _const_flow(shape=SHAPE, vec=(0.0, 0.0, 0.0), batch: int = 1) -> torch.Tensor:
    flow = torch.zeros(batch, 3, *shape, dtype=torch.float32)
    for c, v in enumerate(vec):
        flow[:, c] = v
    return flow


def _shift_reference(src: np.ndarray, axis: int, s: int) -> np.ndarray:
    """Hand reference of warp by a whole-voxel constant flow s along array axis ``axis`` (of X, Y, Z).

    out[p] = src[p + s e_axis] when inside, 0 otherwise.
    """
    out = np.zeros_like(src)
    n = src.shape[2 + axis]
    dst = [slice(None)] * src.ndim
    srcs = [slice(None)] * src.ndim
    if s >= 0:
        dst[2 + axis] = slice(0, max(n - s, 0))
        srcs[2 + axis] = slice(min(s, n), n)
    else:
        dst[2 + axis] = slice(min(-s, n), n)
        srcs[2 + axis] = slice(0, max(n + s, 0))
    out[tuple(dst)] = src[tuple(srcs)]
    return out


@pytest.fixture
def rand_src() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.rand(1, 1, *SHAPE, generator=gen)


# --------------------------------------------------------------------------- warp


def test_identity_coords_channel_c_indexes_axis_c():
    coords = identity_coords(SHAPE, torch.device("cpu"), torch.float32)
    assert coords.shape == (1, 3, *SHAPE)
    assert coords.dtype == torch.float32
    assert coords[0, 0, 3, 1, 2] == 3
    assert coords[0, 1, 3, 1, 2] == 1
    assert coords[0, 2, 3, 1, 2] == 2


def test_warp_zero_flow_is_identity(rand_src):
    out = warp(rand_src, _const_flow())
    assert out.shape == rand_src.shape
    assert out.dtype == torch.float32
    assert out.device == rand_src.device
    torch.testing.assert_close(out, rand_src, atol=WARP_ATOL, rtol=0)


def test_warp_zero_flow_is_bitwise_identity_when_coordinates_round_trip():
    # (3, 4, 5): 2/(n-1) is 1, 2/3, 1/2; the normalisation round trip happens to be exact in float32.
    src = torch.rand(1, 1, 3, 4, 5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(warp(src, _const_flow((3, 4, 5))), src)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("s", [1, 2, -1, -3])
def test_warp_constant_integer_flow_shifts_along_its_own_axis(rand_src, axis, s):
    vec = [0.0, 0.0, 0.0]
    vec[axis] = float(s)
    out = warp(rand_src, _const_flow(vec=vec))
    expected = _shift_reference(rand_src.numpy(), axis, s)
    np.testing.assert_allclose(out.numpy(), expected, atol=WARP_ATOL, rtol=0)


def test_warp_direction_by_hand_on_a_ramp():
    # src = 100 i + 10 j + k; out(p) = src(p + u): a +1 flow along X reads the next i.
    src = _ramp()
    out = warp(src, _const_flow(vec=(1.0, 0.0, 0.0)))
    assert out[0, 0, 0, 0, 0].item() == pytest.approx(
        100.0, abs=RAMP_ATOL
    )  # src[1,0,0]
    assert out[0, 0, 3, 2, 4].item() == pytest.approx(
        424.0, abs=RAMP_ATOL
    )  # src[4,2,4]
    assert out[0, 0, 4, 2, 4].item() == pytest.approx(
        0.0, abs=RAMP_ATOL
    )  # p+u = 5 is outside
    # +1 along Y adds 10, +1 along Z adds 1: no axis is flipped or swapped.
    out_y = warp(src, _const_flow(vec=(0.0, 1.0, 0.0)))
    assert out_y[0, 0, 2, 3, 1].item() == pytest.approx(
        241.0, abs=RAMP_ATOL
    )  # src[2,4,1]
    assert out_y[0, 0, 2, 5, 1].item() == pytest.approx(
        0.0, abs=RAMP_ATOL
    )  # j = 6 outside
    out_z = warp(src, _const_flow(vec=(0.0, 0.0, -2.0)))
    assert out_z[0, 0, 2, 3, 5].item() == pytest.approx(
        233.0, abs=RAMP_ATOL
    )  # src[2,3,3]
    assert out_z[0, 0, 2, 3, 1].item() == pytest.approx(
        0.0, abs=RAMP_ATOL
    )  # k = -1 outside
    # A mixed integer flow adds per-axis shifts.
    out_xyz = warp(src, _const_flow(vec=(1.0, -1.0, 2.0)))
    assert out_xyz[0, 0, 1, 1, 1].item() == pytest.approx(
        203.0, abs=RAMP_ATOL
    )  # src[2,0,3]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_warp_half_voxel_is_average_of_neighbours(rand_src, axis):
    vec = [0.0, 0.0, 0.0]
    vec[axis] = 0.5
    out = warp(rand_src, _const_flow(vec=vec)).numpy()
    src = rand_src.numpy()
    n = SHAPE[axis]
    lo = [slice(None)] * 5
    hi = [slice(None)] * 5
    lo[2 + axis] = slice(0, n - 1)
    hi[2 + axis] = slice(1, n)
    expected_inside = 0.5 * (src[tuple(lo)] + src[tuple(hi)])
    np.testing.assert_allclose(out[tuple(lo)], expected_inside, atol=WARP_ATOL, rtol=0)
    # The last voxel sits halfway between the last sample and the (zero) outside.
    last = [slice(None)] * 5
    last[2 + axis] = slice(n - 1, n)
    np.testing.assert_allclose(
        out[tuple(last)], 0.5 * src[tuple(last)], atol=WARP_ATOL, rtol=0
    )


def test_warp_half_voxel_before_first_voxel_is_half_value(rand_src):
    out = warp(rand_src, _const_flow(vec=(0.0, -0.5, 0.0)))
    torch.testing.assert_close(
        out[:, :, :, 0], 0.5 * rand_src[:, :, :, 0], atol=WARP_ATOL, rtol=0
    )


def test_warp_corner_outside_on_three_axes_contributes_zero(rand_src):
    # At the far corner, p + (0.5, 0.5, 0.5) has 7 of its 8 trilinear corners outside.
    out = warp(rand_src, _const_flow(vec=(0.5, 0.5, 0.5)))
    corner = rand_src[0, 0, -1, -1, -1].item()
    assert out[0, 0, -1, -1, -1].item() == pytest.approx(corner / 8, abs=WARP_ATOL)
    # Along an edge (two axes at their end), 2 of 8 corners are inside.
    edge = rand_src[0, 0, 1, -1, -1].item() + rand_src[0, 0, 2, -1, -1].item()
    assert out[0, 0, 1, -1, -1].item() == pytest.approx(edge / 8, abs=WARP_ATOL)


@pytest.mark.parametrize(
    "vec", [(6.0, 0.0, 0.0), (0.0, -8.0, 0.0), (0.0, 0.0, 100.0), (-40.0, 40.0, 3.0)]
)
def test_warp_fully_outside_gives_zero(rand_src, vec):
    out = warp(rand_src + 1.0, _const_flow(vec=vec))
    assert out.shape == rand_src.shape
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("vec", [(5.0, 0.0, 0.0), (0.0, -6.0, 0.0), (0.0, 0.0, 7.0)])
def test_warp_shift_by_whole_extent_gives_zero(rand_src, vec):
    # Every p + u lands at least one full voxel outside: nominally 0; the float32 coordinate
    # round trip may leave a ~1 ulp weight on the edge voxel (e.g. 1e-7), hence the tolerance.
    out = warp(rand_src + 1.0, _const_flow(vec=vec))
    torch.testing.assert_close(out, torch.zeros_like(out), atol=2 * WARP_ATOL, rtol=0)


def test_warp_multichannel_and_batch_use_their_own_flow():
    gen = torch.Generator().manual_seed(3)
    src = torch.rand(2, 4, *SHAPE, generator=gen)
    flow = torch.zeros(2, 3, *SHAPE)
    flow[0, 0] = 1.0  # batch item 0: +1 along X
    flow[1, 2] = -1.0  # batch item 1: -1 along Z
    out = warp(src, flow)
    assert out.shape == (2, 4, *SHAPE)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(
        out[:1].numpy(), _shift_reference(src[:1].numpy(), 0, 1), atol=WARP_ATOL
    )
    np.testing.assert_allclose(
        out[1:].numpy(), _shift_reference(src[1:].numpy(), 2, -1), atol=WARP_ATOL
    )


def test_warp_varying_flow_samples_each_point_independently():
    src = _ramp()
    flow = torch.zeros(1, 3, *SHAPE)
    flow[0, 0, 1, 2, 3] = 2.0  # this point reads src[3, 2, 3]
    flow[0, 2, 4, 0, 0] = 6.0  # this point reads src[4, 0, 6]
    flow[0, 1, 0, 0, 0] = 0.25  # src(0, 0.25, 0) = 0.75*0 + 0.25*10
    out = warp(src, flow)
    assert out[0, 0, 1, 2, 3].item() == pytest.approx(323.0, abs=RAMP_ATOL)
    assert out[0, 0, 4, 0, 0].item() == pytest.approx(406.0, abs=RAMP_ATOL)
    assert out[0, 0, 0, 0, 0].item() == pytest.approx(2.5, abs=RAMP_ATOL)
    untouched = torch.ones(SHAPE, dtype=torch.bool)
    untouched[1, 2, 3] = untouched[4, 0, 0] = untouched[0, 0, 0] = False
    torch.testing.assert_close(
        out[0, 0][untouched], src[0, 0][untouched], atol=RAMP_ATOL, rtol=0
    )


def test_warp_keeps_src_dtype():
    src = _ramp(dtype=torch.float64)
    out = warp(src, _const_flow(vec=(0.0, 1.0, 0.0)))
    assert out.dtype == torch.float64
    assert out[0, 0, 2, 3, 1].item() == pytest.approx(241.0, abs=RAMP_ATOL)


def test_warp_nearest_rounds_to_the_closest_voxel(rand_src):
    out_small = warp(rand_src, _const_flow(vec=(0.0, 0.4, 0.0)), mode="nearest")
    assert torch.equal(out_small, rand_src)  # nearest copies values: exact
    out_big = warp(rand_src, _const_flow(vec=(0.0, 0.6, 0.0)), mode="nearest")
    assert torch.equal(
        out_big, torch.from_numpy(_shift_reference(rand_src.numpy(), 1, 1))
    )
    out_neg = warp(rand_src, _const_flow(vec=(0.0, 0.0, -1.3)), mode="nearest")
    assert torch.equal(
        out_neg, torch.from_numpy(_shift_reference(rand_src.numpy(), 2, -1))
    )


def test_warp_nearest_on_labels_never_blends():
    labels = torch.randint(
        0, 5, (1, 1, *SHAPE), generator=torch.Generator().manual_seed(5)
    ).float()
    flow = torch.rand(1, 3, *SHAPE, generator=torch.Generator().manual_seed(6)) * 2 - 1
    out = warp(labels, flow, mode="nearest")
    assert set(out.unique().tolist()) <= set(labels.unique().tolist()) | {0.0}


@pytest.mark.parametrize(
    "flow_shape",
    [
        (1, 2, 5, 6, 7),
        (1, 3, 5, 6, 6),
        (1, 3, 7, 6, 5),
        (3, 5, 6, 7),
        (1, 3, 5, 6, 7, 1),
    ],
)
def test_warp_rejects_wrong_flow_shape(rand_src, flow_shape):
    got = ", ".join(map(str, flow_shape))
    with pytest.raises(
        ValueError,
        match=rf"warp\(\) 'flow' must have shape \(\d+, 3, 5, 6, 7\) to match 'src' .*, got \({got}\)",
    ):
        warp(rand_src, torch.zeros(flow_shape))


def test_warp_rejects_single_voxel_axis():
    src = torch.zeros(1, 1, 1, 6, 7)
    with pytest.raises(
        ValueError,
        match=r"warp\(\) 'src' needs at least 2 voxels per axis, got \(1, 6, 7\)",
    ):
        warp(src, torch.zeros(1, 3, 1, 6, 7))


def test_warp_rejects_batch_mismatch_with_value_error():
    with pytest.raises(ValueError, match=r"warp\(\) 'flow'"):
        warp(torch.zeros(2, 1, *SHAPE), torch.zeros(1, 3, *SHAPE))


# --------------------------------------------------------------------------- upsample_flow


def test_upsample_constant_flow_doubles_vectors():
    flow = _const_flow(vec=(1.5, -0.25, 3.0))
    up = upsample_flow(flow, (10, 12, 14))
    assert up.shape == (1, 3, 10, 12, 14)
    assert up.dtype == torch.float32
    for c, v in enumerate((1.5, -0.25, 3.0)):
        torch.testing.assert_close(
            up[0, c], torch.full((10, 12, 14), 2 * v), atol=1e-6, rtol=0
        )


def test_upsample_factor_four_scales_by_four():
    flow = _const_flow(vec=(0.5, -1.0, 2.0), batch=2)
    up = upsample_flow(flow, torch.Size((20, 24, 28)))
    assert up.shape == (2, 3, 20, 24, 28)
    for c, v in enumerate((0.5, -1.0, 2.0)):
        torch.testing.assert_close(
            up[:, c], torch.full((2, 20, 24, 28), 4 * v), atol=1e-6, rtol=0
        )


def test_upsample_factor_one_is_identity():
    flow = torch.rand(1, 3, *SHAPE, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(upsample_flow(flow, SHAPE), flow, atol=1e-6, rtol=0)


def test_upsample_linear_ramp_stays_linear_with_aligned_corners():
    # Component c is a ramp along axis c on the coarse (5, 6, 7) grid.
    coarse = torch.zeros(1, 3, *SHAPE)
    i = torch.arange(5.0).view(5, 1, 1)
    j = torch.arange(6.0).view(1, 6, 1)
    k = torch.arange(7.0).view(1, 1, 7)
    coarse[0, 0] = (0.3 * i - 0.7).expand(SHAPE)
    coarse[0, 1] = (-0.2 * j + 0.1).expand(SHAPE)
    coarse[0, 2] = (0.5 * k + 0.25).expand(SHAPE)
    up = upsample_flow(coarse, (10, 12, 14))
    # align_corners=True: fine index I sits at coarse position I (n-1)/(N-1); vectors doubled.
    big_i = torch.arange(10.0).view(10, 1, 1)
    big_j = torch.arange(12.0).view(1, 12, 1)
    big_k = torch.arange(14.0).view(1, 1, 14)
    expected = torch.stack(
        [
            (2 * (0.3 * big_i * 4 / 9 - 0.7)).expand(10, 12, 14),
            (2 * (-0.2 * big_j * 5 / 11 + 0.1)).expand(10, 12, 14),
            (2 * (0.5 * big_k * 6 / 13 + 0.25)).expand(10, 12, 14),
        ]
    )[None]
    torch.testing.assert_close(up, expected, atol=2e-6, rtol=0)
    # Corners map exactly onto corners.
    assert torch.equal(up[..., 0, 0, 0], 2 * coarse[..., 0, 0, 0])
    assert torch.equal(up[..., -1, -1, -1], 2 * coarse[..., -1, -1, -1])
    # Each component is constant along the other axes.
    torch.testing.assert_close(
        up[0, 0], up[0, 0, :, :1, :1].expand(10, 12, 14), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize(
    "coarse_shape,size,shown",
    [
        (
            (5, 6, 7),
            (10, 12, 15),
            r"\(5, 6, 7\), got \(10, 12, 15\)",
        ),  # inconsistent factors
        ((5, 6, 7), (10, 18, 14), r"\(5, 6, 7\), got \(10, 18, 14\)"),
        ((2, 4, 6), (3, 6, 9), r"\(2, 4, 6\), got \(3, 6, 9\)"),  # consistent but 1.5x
        ((5, 6, 7), (6, 7, 8), r"\(5, 6, 7\), got \(6, 7, 8\)"),
        ((4, 6, 8), (2, 3, 4), r"\(4, 6, 8\), got \(2, 3, 4\)"),  # downsampling
    ],
)
def test_upsample_rejects_non_integer_or_inconsistent_size(coarse_shape, size, shown):
    with pytest.raises(
        ValueError,
        match=r"upsample_flow\(\) 'size' must be one integer multiple of " + shown,
    ):
        upsample_flow(torch.zeros(1, 3, *coarse_shape), size)


# --------------------------------------------------------------------------- compose


def test_compose_with_zero_du_is_phi():
    phi = torch.rand(1, 3, *SHAPE, generator=torch.Generator().manual_seed(21)) * 4 - 2
    out = compose(phi, torch.zeros_like(phi))
    assert out.shape == phi.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, phi, atol=WARP_ATOL * 4, rtol=0)


def test_compose_zero_phi_is_du_exactly():
    du = torch.rand(1, 3, *SHAPE, generator=torch.Generator().manual_seed(22)) * 4 - 2
    assert torch.equal(compose(torch.zeros_like(du), du), du)


def test_compose_two_constant_integer_shifts_add_in_the_interior():
    phi = _const_flow(vec=(1.0, 0.0, -2.0))
    du = _const_flow(vec=(2.0, 1.0, 0.0))
    out = compose(phi, du)
    # Interior: p + du lands inside, phi is constant there, so phi + du = (3, 1, -2).
    for c, v in enumerate((3.0, 1.0, -2.0)):
        torch.testing.assert_close(
            out[0, c, :3, :5, :], torch.full((3, 5, 7), v), atol=WARP_ATOL * 4, rtol=0
        )
    # Where p + du leaves the grid, phi reads as 0 (zero padding) and only du remains.
    for c, v in enumerate((2.0, 1.0, 0.0)):
        torch.testing.assert_close(
            out[0, c, 3:, :, :], torch.full((2, 6, 7), v), atol=WARP_ATOL * 4, rtol=0
        )
        torch.testing.assert_close(
            out[0, c, :, 5:, :], torch.full((5, 1, 7), v), atol=WARP_ATOL * 4, rtol=0
        )


def test_compose_applies_du_first_then_phi_on_a_hand_example():
    # phi varies along X: phi_0(i, j, k) = 0.5 i, phi_1 = j (varies along Y), phi_2 = 0.
    # du = (1, 0, 0.5) everywhere. compose(phi, du)(p) = phi(p + du) + du.
    phi = torch.zeros(1, 3, *SHAPE)
    phi[0, 0] = 0.5 * torch.arange(5.0).view(5, 1, 1).expand(SHAPE)
    phi[0, 1] = torch.arange(6.0).view(1, 6, 1).expand(SHAPE)
    du = _const_flow(vec=(1.0, 0.0, 0.5))
    out = compose(phi, du)
    tol = {"abs": 1e-5}
    # Interior point (1, 2, 3): phi at (2, 2, 3.5) = (1.0, 2, 0); plus du.
    assert out[0, 0, 1, 2, 3].item() == pytest.approx(1.0 + 1.0, **tol)
    assert out[0, 1, 1, 2, 3].item() == pytest.approx(2.0 + 0.0, **tol)
    assert out[0, 2, 1, 2, 3].item() == pytest.approx(0.0 + 0.5, **tol)
    # Last k: p + du has k = 6.5, halfway to the zero outside, so phi counts half.
    assert out[0, 0, 1, 2, 6].item() == pytest.approx(0.5 * 1.0 + 1.0, **tol)
    assert out[0, 1, 1, 2, 6].item() == pytest.approx(0.5 * 2.0 + 0.0, **tol)
    # Last i: p + du has i = 5, outside, so only du remains.
    assert out[0, 0, 4, 2, 3].item() == pytest.approx(1.0, **tol)
    assert out[0, 1, 4, 2, 3].item() == pytest.approx(0.0, **tol)
    assert out[0, 2, 4, 2, 3].item() == pytest.approx(0.5, **tol)
    # Order matters: compose(du, phi) = du(p + phi) + phi differs at the same point.
    swapped = compose(du, phi)
    assert swapped[0, 0, 1, 2, 3].item() == pytest.approx(
        1.0 + 0.5, **tol
    )  # du(1.5, 4, 3) + 0.5
    # The whole field equals warp(phi, du) + du.
    torch.testing.assert_close(out, warp(phi, du) + du, atol=0, rtol=0)


# --------------------------------------------------------------------------- ncc


def _ncc_spec(a: np.ndarray, b: np.ndarray) -> float:
    """SPEC 3 formula in float64: population mean of the product over unbiased stds."""
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    return float(
        np.mean((a - a.mean()) * (b - b.mean())) / (a.std(ddof=1) * b.std(ddof=1))
    )


N_VOX = int(np.prod(SHAPE))


def test_ncc_identical_images_give_n_minus_1_over_n(rand_src):
    # SPEC 3 mixes a 1/N mean with N-1 stds, so the self-similarity is (N-1)/N, not 1.
    value = ncc(rand_src, rand_src.clone())
    assert isinstance(value, float)
    assert value == pytest.approx((N_VOX - 1) / N_VOX, rel=1e-12)
    assert value < 1.0


def test_ncc_is_invariant_to_positive_affine_intensity(rand_src):
    assert ncc(rand_src, rand_src * 2 + 3) == pytest.approx(
        (N_VOX - 1) / N_VOX, rel=1e-6
    )


def test_ncc_negated_image(rand_src):
    assert ncc(rand_src, -rand_src) == pytest.approx(-(N_VOX - 1) / N_VOX, rel=1e-12)


def test_ncc_tiny_hand_case():
    # a = (1, 2, 3), b = (1, 3, 2): mean product (-1*-1 + 0 + 1*0)/3 = 1/3; stds are 1 (ddof=1).
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([1.0, 3.0, 2.0])
    assert ncc(a, b) == pytest.approx(1.0 / 3.0, rel=1e-15)


def test_ncc_matches_float64_numpy_reference():
    gen = torch.Generator().manual_seed(31)
    a = torch.rand(1, 1, *SHAPE, generator=gen)
    b = 0.6 * a + 0.4 * torch.rand(1, 1, *SHAPE, generator=gen)
    expected = _ncc_spec(a.numpy(), b.numpy())
    assert ncc(a, b) == pytest.approx(expected, rel=1e-12)
    assert ncc(b, a) == pytest.approx(expected, rel=1e-12)


def test_ncc_sums_in_float64_for_large_offsets():
    # A large DC offset destroys float32 variance sums; the float64 path must not care.
    gen = torch.Generator().manual_seed(32)
    a = torch.rand(1, 1, *SHAPE, generator=gen) + 1000.0
    b = torch.rand(1, 1, *SHAPE, generator=gen) + 1000.0
    assert ncc(a, b) == pytest.approx(
        _ncc_spec(a.numpy(), b.numpy()), rel=1e-9, abs=1e-12
    )


@pytest.mark.parametrize("which", ["a", "b", "both"])
def test_ncc_constant_image_is_zero(rand_src, which):
    const = torch.full_like(rand_src, 0.7)
    a = const if which in ("a", "both") else rand_src
    b = const if which in ("b", "both") else rand_src
    value = ncc(a, b)
    assert value == 0.0
    assert isinstance(value, float)
