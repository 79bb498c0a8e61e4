"""Property-based tests of the parsers that read untrusted text: they raise the project's own errors only.

NIfTI headers (the pre-check before SimpleITK reads a file), the engine manifest, the pairs CSV and the
``--iterstop`` / ``--intensity`` specs. Whatever the input, the result is either a valid object or an
:class:`~iirp.errors.IirpError` subclass, never a TypeError, KeyError, AttributeError... from deep inside.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import shutil
import string
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from iirp.errors import ImageError, IntensitySpecError, IterStopSpecError  # noqa: E402
from iirp.iterstop import parse_iterstop  # noqa: E402
from iirp.manifest import Manifest, ManifestMismatchError  # noqa: E402
from iirp.runtime.intensity import parse_intensity  # noqa: E402
from iirp.runtime.pairs import MAX_ID_LENGTH, RESERVED_IDS, PairsFileError, read_pairs  # noqa: E402

sitk = pytest.importorskip("SimpleITK")
from iirp.runtime.imageio import parse_nifti_header, read_image  # noqa: E402

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


# --------------------------------------------------------------------------- NIfTI


@pytest.fixture(scope="module")
def nifti_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    import numpy as np

    path = tmp_path_factory.mktemp("nifti") / "valid.nii"
    image = sitk.GetImageFromArray(np.linspace(0, 1, 6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8))
    sitk.WriteImage(image, str(path))
    return path.read_bytes()


@SETTINGS
@given(st.binary(max_size=700))
def test_nifti_header_of_any_bytes(raw: bytes) -> None:
    try:
        header = parse_nifti_header(raw, "a file")
    except ImageError:
        return
    if header is not None:
        assert header.version in (1, 2) and header.bitpix > 0 and header.vox_offset >= 348


@SETTINGS
@given(edits=st.lists(st.tuples(st.integers(0, 351), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 2400)), compressed=st.booleans())
def test_reading_a_damaged_nifti(nifti_bytes: bytes, tmp_path_factory: pytest.TempPathFactory,
                                 edits: list[tuple[int, int]], cut: int | None, compressed: bool) -> None:
    """Header bytes overwritten and the file cut anywhere: an ImageError or a valid float32 image."""
    raw = bytearray(nifti_bytes)
    for offset, value in edits:
        raw[offset] = value
    data = bytes(raw[:cut] if cut is not None else raw)
    folder = tmp_path_factory.mktemp("damaged")
    path = folder / ("damaged.nii.gz" if compressed else "damaged.nii")
    path.write_bytes(gzip.compress(data) if compressed else data)
    try:
        image = read_image(path, "fixed")
    except ImageError:
        return
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert image.GetDimension() == 3 and image.GetPixelID() == sitk.sitkFloat32


# --------------------------------------------------------------------------- manifest


@pytest.fixture(scope="module")
def manifest_dict() -> dict:
    """A valid manifest as JSON (the stage files need not exist: loading does not read them)."""
    digest = "0" * 64
    spec = {"file": "feature_extractor.onnx", "sha256": digest,
            "inputs": [{"name": "image", "shape": [2, 1, 32, 32, 32], "dtype": "float32"}],
            "outputs": [{"name": f"f{k}", "shape": [2, 8, 32, 32, 32], "dtype": "float32"} for k in (1, 2, 3, 4)]}
    stages = {"feature_extractor": spec}
    for level in (1, 2, 3, 4):
        stages[f"flow_estimator_{level}"] = {
            "file": f"flow_estimator_{level}.onnx", "sha256": digest,
            "inputs": [{"name": "moving_features", "shape": [1, 8, "X", "Y/2", 4], "dtype": "float32"},
                       {"name": "fixed_features", "shape": [1, 8, 4, 4, 4], "dtype": "float32"}],
            "outputs": [{"name": "flow", "shape": [1, 3, 4, 4, 4], "dtype": "float32"}]}
    return {"format": "iirp-engines", "format_version": 1, "source_sha256": digest, "model": {},
            "model_grid": {"size": [32, 32, 32], "spacing": [1.0, 1.0, 1.0], "orientation": "RAS"},
            "precision": "fp32", "opset": 18, "dynamic": False, "stages": stages}


def _load(folder: Path, payload: object) -> None:
    (folder / "manifest.json").write_text(json.dumps(payload))
    try:
        manifest = Manifest.load(folder)
    except ManifestMismatchError:
        return
    try:  # a manifest that loads can be used without surprises
        manifest.check_input_shape((32, 32, 32))
        manifest.verify_files(folder)
        manifest.verify_files(folder, engines=True)
    except ManifestMismatchError:
        pass


def test_the_valid_manifest_loads(manifest_dict: dict, tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(manifest_dict))
    assert Manifest.load(tmp_path).size == (32, 32, 32)


@SETTINGS
@given(payload=JSON)
def test_manifest_of_any_json(payload: object, tmp_path_factory: pytest.TempPathFactory) -> None:
    _load(tmp_path_factory.mktemp("m"), payload)


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _paths(item, (*prefix, i))
    return found


@SETTINGS
@given(data=st.data(), replacement=JSON)
def test_manifest_with_one_field_replaced(manifest_dict: dict, data: st.DataObject, replacement: object,
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    payload = copy.deepcopy(manifest_dict)
    path = data.draw(st.sampled_from(_paths(payload)[1:]))
    target = payload
    for key in path[:-1]:
        target = target[key]
    if data.draw(st.booleans()) and isinstance(target, dict):
        del target[path[-1]]
    else:
        target[path[-1]] = replacement
    _load(tmp_path_factory.mktemp("m"), payload)


# --------------------------------------------------------------------------- pairs CSV


CELL = st.text(alphabet=string.printable + "é/\\.\x00", max_size=16)


@SETTINGS
@given(header=st.lists(st.sampled_from(["fixed", "moving", "id", "moving_seg", "labels", "x", ""]), max_size=6),
       rows=st.lists(st.lists(CELL, max_size=7), max_size=5), raw=st.one_of(st.none(), st.text(max_size=200)))
def test_pairs_csv_of_any_text(header: list[str], rows: list[list[str]], raw: str | None,
                               tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("csv")
    path = folder / "pairs.csv"
    if raw is not None:
        path.write_text(raw, encoding="utf-8", errors="surrogatepass")
    else:
        import csv

        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)
    try:
        pairs = read_pairs(path)
    except PairsFileError:
        return
    ids = [p.id for p in pairs]
    assert len({i.lower() for i in ids}) == len(ids)
    for pair_id in ids:
        assert pair_id and not pair_id.startswith(".") and len(pair_id) <= MAX_ID_LENGTH
        assert "/" not in pair_id and "\\" not in pair_id and not RESERVED_IDS.match(pair_id)
        assert (folder / pair_id).parent == folder


# --------------------------------------------------------------------------- option specs


@SETTINGS
@given(spec=st.one_of(st.text(max_size=30), st.from_regex(r"fixed:-?\d{1,7}(,-?\d{1,7}){0,5}", fullmatch=True),
                      st.sampled_from(["official", "paper", "rpnet", " Official ", "fixed:1,1,1,1"])),
       delta=st.floats(allow_nan=True, allow_infinity=True), max_iters=st.integers(-3, 10**9))
def test_iterstop_spec(spec: str, delta: float, max_iters: int) -> None:
    try:
        rule = parse_iterstop(spec, delta, max_iters)
    except IterStopSpecError:
        return
    assert rule.kind in ("official", "paper", "fixed") and math.isfinite(rule.delta) and rule.delta >= 0
    assert rule.max_iters >= 1
    if rule.kind == "fixed":
        assert rule.counts is not None and len(rule.counts) == 4
        assert all(0 <= c <= rule.max_iters for c in rule.counts)


@SETTINGS
@given(spec=st.one_of(st.text(max_size=30),
                      st.from_regex(r"(percentile|window|minmax):[-+.\deEnaif]{0,8},[-+.\deEnaif]{0,8}", fullmatch=True)))
def test_intensity_spec(spec: str) -> None:
    try:
        rule = parse_intensity(spec)
    except IntensitySpecError:
        return
    assert rule.kind in ("minmax", "percentile", "window")
    if rule.kind != "minmax":
        assert math.isfinite(rule.low) and math.isfinite(rule.high) and rule.low < rule.high
    if rule.kind == "percentile":
        assert 0 <= rule.low and rule.high <= 100
