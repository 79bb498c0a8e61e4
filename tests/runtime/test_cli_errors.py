"""``iirp-run`` error handling: exit code 2, one line on stderr naming the problem and the file,
and nothing written (the output folder absent afterwards, or unchanged if it existed)."""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from support import blob as _blob
from support import tiny_inputs
from support import write_array as _write

sitk = pytest.importorskip("SimpleITK")
torch = pytest.importorskip("torch")
from typer.testing import CliRunner  # noqa: E402

from iirp.cli import run_app  # noqa: E402

SIZE = (32, 32, 32)  # (x, y, z); tiny so inference stays cheap
PROG_PREFIX = "iirp-run: error: "

# --------------------------------------------------------------------------- shared fixtures


def _invoke(args: list[str]):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(run_app, [str(a) for a in args])


def _stderr(result) -> str:  # type: ignore[no-untyped-def]
    try:
        return result.stderr
    except ValueError:  # older click mixes stderr into output
        return result.output


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its content (None for folders)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


def _assert_one_line_error(result, *needles: str) -> str:  # type: ignore[no-untyped-def]
    err = _stderr(result)
    assert result.exit_code == 2, f"exit {result.exit_code}; output={result.output!r}; exc={result.exception!r}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    line = lines[0]
    assert line.startswith(PROG_PREFIX), line
    assert len([ln for ln in result.output.splitlines() if ln.strip()]) == 1, result.output
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


# --------------------------------------------------------------------------- bad inputs

Case = Callable[[dict, Path], tuple[dict, list[str], str]]


def _missing_fixed(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    p = tmp / "absent_fixed.nii.gz"
    return {"fixed": p}, [str(p)], r"fixed image not found"


def _missing_moving(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    p = tmp / "absent_moving.nii.gz"
    return {"moving": p}, [str(p)], r"moving image not found"


def _fixed_is_folder(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    p = tmp / "a_folder.nii.gz"
    p.mkdir()
    return {"fixed": p}, [str(p)], r"fixed image is not a file"


def _random_bytes(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    p = tmp / "random.nii.gz"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return {"fixed": p}, [str(p)], r"cannot read fixed image"


def _empty_file(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    p = tmp / "empty.nii.gz"
    p.write_bytes(b"")
    return {"moving": p}, [str(p)], r"cannot read moving image"


def _truncated_header(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    raw = gzip.decompress(d["fixed"].read_bytes())
    p = tmp / "truncated_header.nii.gz"
    p.write_bytes(gzip.compress(raw[:200]))  # a NIfTI-1 header is 348 bytes
    return {"fixed": p}, [str(p)], r"cannot read fixed image"


def _truncated_gzip(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    blob = d["fixed"].read_bytes()
    p = tmp / "truncated.nii.gz"
    p.write_bytes(blob[: len(blob) // 2])  # gzip stream cut in the middle of the voxel data
    return {"fixed": p}, [str(p)], r"fixed image"


def _truncated_nii(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    raw = gzip.decompress(d["moving"].read_bytes())
    p = tmp / "truncated.nii"
    p.write_bytes(raw[: len(raw) // 2])  # uncompressed, half the voxels missing
    return {"moving": p}, [str(p)], r"moving image"


def _image_2d(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    p = _write(_blob((15.5, 15.5), shape=(32, 32)), tmp / "flat.nii.gz")
    return {"fixed": p}, [str(p)], r"must be 3D, got 2D"


def _image_4d(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    vol = _blob((15.5, 15.5, 15.5))
    p = _write(np.stack([vol, vol]), tmp / "series.nii.gz")
    return {"moving": p}, [str(p)], r"must be 3D, got 4D"


def _vector_image(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    vol = _blob((15.5, 15.5, 15.5))
    p = _write(np.stack([vol, vol, vol], axis=-1), tmp / "vector.nii.gz", is_vector=True)
    return {"fixed": p}, [str(p)], r"must be scalar"


def _zeros(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    p = _write(np.zeros(SIZE, np.float32), tmp / "zeros.nii.gz")
    return {"fixed": p}, [str(p)], r"empty or constant"


def _constant(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    p = _write(np.full(SIZE, 7.0, np.float32), tmp / "seven.nii.gz")
    return {"moving": p}, [str(p)], r"empty or constant"


def _nan(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    vol = _blob((15.5, 15.5, 15.5))
    vol[3, 4, 5] = np.nan
    vol[10, 10, 10] = np.nan
    p = _write(vol, tmp / "nan.nii.gz")
    return {"fixed": p}, [str(p)], r"NaN/Inf values in 2 voxel"


def _inf(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    vol = _blob((15.5, 15.5, 15.5))
    vol[3, 4, 5] = np.inf
    p = _write(vol, tmp / "inf.nii.gz")
    return {"moving": p}, [str(p)], r"NaN/Inf values in 1 voxel"


def _neg_inf(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    vol = _blob((15.5, 15.5, 15.5))
    vol[0, 0, 0] = -np.inf
    p = _write(vol, tmp / "neginf.nii.gz")
    return {"fixed": p}, [str(p)], r"NaN/Inf values in"


def _nan_nrrd(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    vol = _blob((15.5, 15.5, 15.5))
    vol[3, 4, 5] = np.nan
    p = _write(vol, tmp / "nan.nrrd")
    return {"fixed": p}, [str(p)], r"NaN/Inf values in 1 voxel"


def _inf_mha(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    vol = _blob((15.5, 15.5, 15.5))
    vol[3, 4, 5] = np.inf
    vol[4, 4, 5] = -np.inf
    p = _write(vol, tmp / "inf.mha")
    return {"moving": p}, [str(p)], r"NaN/Inf values in 2 voxel"


def _ckpt_missing(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    p = tmp / "absent.pt"
    return {"ckpt": p}, [str(p)], r"checkpoint not found"


def _ckpt_garbage(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    p = tmp / "garbage.pt"
    p.write_bytes(b"not a torch file at all" * 50)
    return {"ckpt": p}, [str(p)], r"cannot be read as a weights-only torch file"


def _ckpt_key_removed(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    state = dict(d["state"])
    del state["decoder3.Conv2.main.bias"]
    p = tmp / "key_removed.pt"
    torch.save(state, p)
    return {"ckpt": p}, [str(p), "decoder3.Conv2.main.bias"], r"does not match RP-Net.*missing keys"


def _ckpt_wrong_shape(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    state = dict(d["state"])
    state["encoder.block2.main.weight"] = torch.zeros(16, 8, 1, 1, 1)
    p = tmp / "wrong_shape.pt"
    torch.save({"config": {"size": SIZE}, "model_state": state}, p)
    return {"ckpt": p}, [str(p), "encoder.block2.main.weight"], r"shape mismatch"


def _ckpt_arbitrary_object(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    p = tmp / "object.pt"
    torch.save({"config": {"size": SIZE}, "model_state": d["state"], "extra": _Arbitrary()}, p)
    return {"ckpt": p}, [str(p)], r"weights-only"


class _Arbitrary:
    pass


def _seg_missing(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    p = tmp / "absent_seg.nii.gz"
    return {"seg": p}, [str(p)], r"moving-seg image not found"


def _seg_corrupt(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    p = tmp / "seg_garbage.nii.gz"
    p.write_bytes(b"\x00\x01garbage" * 100)
    return {"seg": p}, [str(p)], r"cannot read moving-seg image"


def _seg_2d(d: dict, tmp: Path):  # type: ignore[no-untyped-def]
    p = _write(np.ones((32, 32), np.int16), tmp / "seg2d.nii.gz")
    return {"seg": p}, [str(p)], r"must be 3D, got 2D"


BAD_INPUTS: dict[str, Case] = {
    "missing_fixed": _missing_fixed,
    "missing_moving": _missing_moving,
    "fixed_is_folder": _fixed_is_folder,
    "random_bytes": _random_bytes,
    "empty_file": _empty_file,
    "truncated_header": _truncated_header,
    "truncated_gzip": _truncated_gzip,
    "truncated_nii": _truncated_nii,
    "image_2d": _image_2d,
    "image_4d": _image_4d,
    "vector_image": _vector_image,
    "zeros": _zeros,
    "constant": _constant,
    "nan": _nan,
    "inf": _inf,
    "neg_inf": _neg_inf,
    "nan_nrrd": _nan_nrrd,
    "inf_mha": _inf_mha,
    "ckpt_missing": _ckpt_missing,
    "ckpt_garbage": _ckpt_garbage,
    "ckpt_key_removed": _ckpt_key_removed,
    "ckpt_wrong_shape": _ckpt_wrong_shape,
    "ckpt_arbitrary_object": _ckpt_arbitrary_object,
    "seg_missing": _seg_missing,
    "seg_corrupt": _seg_corrupt,
    "seg_2d": _seg_2d,
}


@pytest.mark.parametrize("out_exists", [False, True], ids=["new_out", "existing_out"])
@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input(case: str, out_exists: bool, data: dict, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    override, needles, pattern = BAD_INPUTS[case](data, work)
    paths = {**{k: data[k] for k in ("fixed", "moving", "seg", "ckpt")}, **override}
    out = tmp_path / "out"
    if out_exists:
        out.mkdir()
        (out / "keep.txt").write_text("previous run\n")
    before = _snapshot(tmp_path)

    result = _invoke([
        paths["fixed"], paths["moving"], "--checkpoint", paths["ckpt"], "-o", out,
        "--moving-seg", paths["seg"], "--iterstop", "rpnet",
    ])

    line = _assert_one_line_error(result, *needles)
    assert re.search(pattern, line), f"{pattern!r} not found in {line!r}"
    assert _snapshot(tmp_path) == before
    assert out.exists() == out_exists


# --------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    "spec",
    ["bogus", "fixed:1,2,3", "fixed:1,2,3,4,5", "fixed:a,b,c,d", "fixed:-1,1,1,1", "fixed", ""],
)
def test_bad_iterstop(spec: str, data: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _invoke([data["fixed"], data["moving"], "--checkpoint", data["ckpt"], "-o", out, "--iterstop", spec])
    line = _assert_one_line_error(result, f"iterstop spec {spec!r}")
    assert "fixed:a,b,c,d" in line or "fixed:1,3,2,2" in line  # says what is expected
    assert not out.exists()


@pytest.mark.parametrize(
    ("option", "value", "pattern"),
    [
        ("--delta", "-0.1", r"iterstop 'delta' must be a finite number >= 0, got -0\.1"),
        ("--delta", "nan", r"iterstop 'delta' must be a finite number >= 0, got nan"),
        ("--max-iters", "0", r"iterstop 'max_iters' must be an integer >= 1, got 0"),
    ],
)
def test_bad_iterstop_numbers(option: str, value: str, pattern: str, data: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _invoke([data["fixed"], data["moving"], "--checkpoint", data["ckpt"], "-o", out, option, value])
    line = _assert_one_line_error(result)
    assert re.search(pattern, line), line
    assert not out.exists()


@pytest.mark.parametrize(
    "spec",
    ["bogus", "percentile:5", "percentile:5,", "percentile:99,1", "percentile:-1,50", "percentile:1,101",
     "window:10,1", "window:1,1", "window:a,b", "window:nan,1", "minmax:1,2"],
)
def test_bad_intensity(spec: str, data: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _invoke([data["fixed"], data["moving"], "--checkpoint", data["ckpt"], "-o", out, "--intensity", spec])
    line = _assert_one_line_error(result, f"intensity spec {spec!r}")
    assert "percentile:LO,HI" in line and "window:LO,HI" in line
    assert not out.exists()


def test_intensity_window_outside_image_range(data: dict, tmp_path: Path) -> None:
    """A well-formed window that leaves an image constant is reported, and nothing is written."""
    out = tmp_path / "out"
    result = _invoke([
        data["fixed"], data["moving"], "--checkpoint", data["ckpt"], "-o", out,
        "--intensity", "window:1000,2000", "--iterstop", "rpnet",
    ])
    line = _assert_one_line_error(result)
    assert re.search(r"fixed image .*constant under intensity rule 'window:1000,2000'", line), line
    assert not out.exists()


def test_checkpoint_option_missing(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _invoke([data["fixed"], data["moving"], "-o", out])
    _assert_one_line_error(result, "give exactly one of --checkpoint CKPT or --engines DIR")
    assert not out.exists()


def test_checkpoint_and_engines_together(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _invoke([data["fixed"], data["moving"], "--checkpoint", data["ckpt"], "--engines", tmp_path, "-o", out])
    _assert_one_line_error(result, "give exactly one of --checkpoint CKPT or --engines DIR")
    assert not out.exists()


def test_ort_engine_needs_an_engine_folder(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _invoke([data["fixed"], data["moving"], "--checkpoint", data["ckpt"], "--engine", "ort", "-o", out])
    _assert_one_line_error(result, "engine 'ort' needs --engines DIR")
    assert not out.exists()


def test_engine_folder_without_manifest(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _invoke([data["fixed"], data["moving"], "--engines", tmp_path, "-o", out])
    _assert_one_line_error(result, "manifest.json not found")
    assert not out.exists()


def test_affine_and_initial_transform_together(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    tfm = tmp_path / "t.tfm"
    sitk.WriteTransform(sitk.Transform(3, sitk.sitkIdentity), str(tfm))
    result = _invoke([
        data["fixed"], data["moving"], "--checkpoint", data["ckpt"], "-o", out,
        "--affine", "--initial-transform", tfm,
    ])
    _assert_one_line_error(result, "--affine", "--initial-transform")
    assert not out.exists()


@pytest.mark.parametrize(
    ("option", "value", "pattern"),
    [("--engine", "nonesuch", r"engine 'nonesuch' needs --engines DIR"),
     ("--device", "tpu", r"device must be 'cpu' or 'cuda\[:N\]', got 'tpu'")],
)
def test_bad_engine_or_device(option: str, value: str, pattern: str, data: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _invoke([data["fixed"], data["moving"], "--checkpoint", data["ckpt"], "-o", out, option, value])
    line = _assert_one_line_error(result)
    assert re.search(pattern, line), line
    assert not out.exists()


# --------------------------------------------------------------------------- bad output location


def test_output_parent_is_a_file(data: dict, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("I am a file\n")
    out = blocker / "sub" / "out"
    before = _snapshot(tmp_path)
    result = _invoke([data["fixed"], data["moving"], "--checkpoint", data["ckpt"], "-o", out, "--iterstop", "rpnet"])
    line = _assert_one_line_error(result, str(out), str(blocker))
    assert re.search(r"output folder .* cannot be created: .* is not a folder", line), line
    assert _snapshot(tmp_path) == before


def test_output_is_a_file(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("a file where the folder should go\n")
    before = _snapshot(tmp_path)
    result = _invoke([data["fixed"], data["moving"], "--checkpoint", data["ckpt"], "-o", out, "--iterstop", "rpnet"])
    line = _assert_one_line_error(result, str(out))
    assert "exists and is not a folder" in line
    assert _snapshot(tmp_path) == before


def test_output_error_comes_before_model_loading(data: dict, tmp_path: Path) -> None:
    """An unwritable -o is reported even when the checkpoint is also missing (cheap checks first)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    result = _invoke([data["fixed"], data["moving"], "--checkpoint", tmp_path / "absent.pt", "-o", blocker / "o"])
    _assert_one_line_error(result, "output folder")


def test_verbose_shows_traceback(data: dict, tmp_path: Path) -> None:
    missing = tmp_path / "absent.nii.gz"
    out = tmp_path / "out"
    result = _invoke([missing, data["moving"], "--checkpoint", data["ckpt"], "-o", out, "--verbose"])
    assert result.exit_code == 2
    err = _stderr(result)
    assert "Traceback" in err
    assert err.strip().splitlines()[-1] == f"{PROG_PREFIX}fixed image not found: {missing}"
    assert not out.exists()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Valid inputs: a fixed/moving pair, an int16 label map and a tiny random-weight checkpoint."""
    return tiny_inputs(tmp_path_factory.mktemp("cli_inputs"))
