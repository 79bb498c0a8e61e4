"""``iirp.runtime.intensity``: ``--intensity`` specs and the mapping of an image to [0, 1]."""

from __future__ import annotations

import re

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from iirp.errors import IirpError, ImageError, IntensitySpecError  # noqa: E402
from iirp.runtime.intensity import IntensityRule, normalize, parse_intensity  # noqa: E402

SPEC_ERROR = "not understood: expected 'minmax', 'percentile:LO,HI'"


def _image(array_xyz: np.ndarray) -> sitk.Image:
    """``(X, Y, Z)`` array -> image with a non-trivial grid (anisotropic, RAS-stored, offset)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    image.SetSpacing((0.8, 1.2, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    return image


def _values(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


# --------------------------------------------------------------------------- parse_intensity


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("minmax", IntensityRule("minmax")),
        ("  MinMax ", IntensityRule("minmax")),
        ("percentile:1,99", IntensityRule("percentile", 1.0, 99.0)),
        ("percentile:0,100", IntensityRule("percentile", 0.0, 100.0)),
        ("PERCENTILE: 0.5 , 99.5", IntensityRule("percentile", 0.5, 99.5)),
        ("window:-200,400", IntensityRule("window", -200.0, 400.0)),
        ("window:-1000.5,3e3", IntensityRule("window", -1000.5, 3000.0)),
        ("window:-5,-1", IntensityRule("window", -5.0, -1.0)),
    ],
)
def test_parse_intensity_valid(spec: str, expected: IntensityRule) -> None:
    rule = parse_intensity(spec)
    assert rule == expected
    assert parse_intensity(rule.spec) == rule  # the canonical spec reads back the same


def test_intensity_rule_spec_strings() -> None:
    assert IntensityRule("minmax").spec == "minmax"
    assert IntensityRule("percentile", 1.0, 99.0).spec == "percentile:1,99"
    assert IntensityRule("window", -200.0, 400.5).spec == "window:-200,400.5"


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "max",
        "minmax:0,1",
        "zscore",
        "percentile",
        "percentile:",
        "percentile:5",
        "percentile:1,2,3",
        "percentile:a,b",
        "percentile:-1,50",
        "percentile:50,101",
        "percentile:60,40",
        "percentile:30,30",
        "window",
        "window:",
        "window:5,5",
        "window:400,-200",
        "window:a,1",
        "window:nan,1",
        "window:-inf,0",
        "window:0,inf",
        "window:1;2",
    ],
)
def test_parse_intensity_invalid(spec: str) -> None:
    with pytest.raises(IntensitySpecError, match=re.escape(f"intensity spec {spec!r} {SPEC_ERROR}")) as info:
        parse_intensity(spec)
    # one line for the CLI, and a caller mistake as well
    assert isinstance(info.value, IirpError)
    assert isinstance(info.value, ValueError)


# --------------------------------------------------------------------------- normalize


def test_minmax_maps_to_exactly_zero_one_and_keeps_grid() -> None:
    rng = np.random.default_rng(0)
    values = rng.uniform(-37.5, 912.25, size=(6, 5, 4))
    image = _image(values.astype(np.float64))
    out = normalize(image, parse_intensity("minmax"))
    assert out.GetPixelID() == sitk.sitkFloat32
    assert out.GetSize() == image.GetSize()
    assert out.GetSpacing() == image.GetSpacing()
    assert out.GetOrigin() == image.GetOrigin()
    assert out.GetDirection() == image.GetDirection()
    result = _values(out)
    assert result.min() == 0.0
    assert result.max() == 1.0
    expected = (values - values.min()) / (values.max() - values.min())
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-7)
    # index order is untouched: the minimum stays where it was
    assert np.unravel_index(result.argmin(), result.shape) == np.unravel_index(values.argmin(), values.shape)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_minmax_accepts_pixel_types(dtype: type) -> None:
    values = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(dtype)
    out = normalize(_image(values), parse_intensity("minmax"))
    np.testing.assert_allclose(_values(out), values.astype(np.float64) / 23.0, rtol=1e-6)


def test_percentile_clips_outliers() -> None:
    values = np.linspace(0.0, 100.0, 1000).reshape(10, 10, 10)
    values[0, 0, 0] = 1e6  # one bright outlier
    values[9, 9, 9] = -1e6  # one dark outlier
    image = _image(values)
    out = _values(normalize(image, parse_intensity("percentile:1,99")))
    low, high = np.percentile(values, [1, 99])
    assert out.min() == 0.0 and out.max() == 1.0
    assert out[0, 0, 0] == 1.0
    assert out[9, 9, 9] == 0.0
    np.testing.assert_allclose(out, (np.clip(values, low, high) - low) / (high - low), rtol=1e-6, atol=1e-7)
    # the bulk keeps its spread; minmax would have squashed it into ~1e-4 around 0.5
    bulk = out[1:9, 1:9, 1:9]
    assert bulk.max() - bulk.min() > 0.5
    squashed = _values(normalize(image, parse_intensity("minmax")))[1:9, 1:9, 1:9]
    assert squashed.max() - squashed.min() < 1e-3


def test_window_clips_hounsfield_units() -> None:
    hu = np.array([-1000.0, -200.0, -50.0, 100.0, 250.0, 400.0, 3000.0, 0.0]).reshape(2, 2, 2)
    out = _values(normalize(_image(hu.astype(np.int16)), parse_intensity("window:-200,400")))
    expected = np.array([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0 / 3.0]).reshape(2, 2, 2)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    assert out.flat[1] == 0.0 and out.flat[3] == 0.5 and out.flat[5] == 1.0


def test_window_inside_range_does_not_reach_bounds() -> None:
    # a window wider than the data: values map linearly, without stretching to [0, 1]
    out = _values(normalize(_image(np.array([0.0, 50.0, 100.0, 25.0]).reshape(1, 2, 2)), parse_intensity("window:-100,300")))
    np.testing.assert_allclose(out.ravel(), [0.25, 0.375, 0.5, 0.3125], rtol=1e-6)


ROLE = "fixed image /data/sub-01 [T1w].nii.gz"


def test_constant_image_under_minmax_names_role() -> None:
    image = _image(np.full((3, 4, 5), 7.0, dtype=np.float32))
    with pytest.raises(ImageError, match=re.escape(f"{ROLE} is constant under intensity rule 'minmax' (7..7)")):
        normalize(image, parse_intensity("minmax"), ROLE)


def test_constant_image_default_role() -> None:
    with pytest.raises(ImageError, match="^input image is constant under intensity rule 'minmax'"):
        normalize(_image(np.zeros((2, 2, 2), dtype=np.float32)), parse_intensity("minmax"))


def test_window_outside_image_range_names_role() -> None:
    image = _image(np.linspace(0.0, 10.0, 24).reshape(2, 3, 4))
    with pytest.raises(
        ImageError,
        match=re.escape(
            f"{ROLE} is constant under intensity rule 'window:100,200': all its values lie outside 100..200"
        ),
    ):
        normalize(image, parse_intensity("window:100,200"), ROLE)


def test_window_below_image_range_names_role() -> None:
    image = _image(np.linspace(500.0, 900.0, 24).reshape(2, 3, 4))
    with pytest.raises(ImageError, match=re.escape(f"{ROLE} is constant under intensity rule 'window:-200,400'")):
        normalize(image, parse_intensity("window:-200,400"), ROLE)


def test_percentile_of_mostly_constant_image_names_role() -> None:
    values = np.zeros((10, 10, 10))
    values[0, 0, :3] = 5.0  # 0.3 % of the voxels: inside the clipped tail
    with pytest.raises(
        ImageError, match=re.escape(f"{ROLE} is constant under intensity rule 'percentile:1,99' (0..0)")
    ):
        normalize(_image(values), parse_intensity("percentile:1,99"), ROLE)
