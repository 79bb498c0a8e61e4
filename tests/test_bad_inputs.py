"""The catalogue of bad inputs and faults, for every command: the README's "Guarantees".

Every case runs a real command line (typer's CliRunner in this process, or a subprocess where the
case needs a process of its own: a file-size limit) and asserts:

* the exit code (2 for every bad input);
* exactly one line on stderr, ``<prog>: error: ...``, naming the problem (and the file);
* nothing on stdout;
* the filesystem under the output folder's parent (which holds the output folder and the
  case's inputs) is unchanged, byte for byte: nothing written, nothing left half-written.

Each case runs twice: with the output folder absent and with it present but empty.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from support import blob, label_volume, tiny_inputs, write_array

sitk = pytest.importorskip("SimpleITK")
torch = pytest.importorskip("torch")
from typer.testing import CliRunner  # noqa: E402

from iirp.cli import bench_app, export_app, run_app, train_app  # noqa: E402

SIZE = (32, 32, 32)
APPS = {"iirp-run": run_app, "iirp-export": export_app, "iirp-bench": bench_app, "iirp-train": train_app}
OUT = "{out}"  # replaced by the case's output folder


@dataclass(frozen=True)
class Case:
    """One bad command line.

    Attributes:
        prog: the command.
        argv: its arguments; :data:`OUT` stands for the output folder.
        pattern: a regular expression the error line must match (after ``<prog>: error: ``).
        needles: strings the line must contain (file names).
        fsize_limit: run in a subprocess whose files may not grow beyond this many bytes (``ulimit -f``).
    """

    prog: str
    argv: list[str]
    pattern: str
    needles: tuple[str, ...] = ()
    fsize_limit: int | None = None


Builder = Callable[[dict, Path], Case]
CASES: dict[str, Builder] = {}


def case(name: str) -> Callable[[Builder], Builder]:
    def _register(fn: Builder) -> Builder:
        assert name not in CASES, name
        CASES[name] = fn
        return fn

    return _register


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Valid inputs: a fixed/moving pair, an int16 label map, a tiny checkpoint and its export."""
    from iirp.export import export_checkpoint

    root = tmp_path_factory.mktemp("bad_inputs")
    d = tiny_inputs(root)
    export_checkpoint(d["ckpt"], root / "engines", verify=False, progress=False, exporter="torchscript")
    d["engines"] = root / "engines"
    return d


def _run(d: dict, **override: object) -> list[str]:
    """The reference-engine command line of a good run, with ``override`` replacing its files."""
    paths = {**{k: d[k] for k in ("fixed", "moving", "seg", "ckpt")}, **override}
    seg = [] if paths["seg"] is None else ["--moving-seg", str(paths["seg"])]
    return [str(paths["fixed"]), str(paths["moving"]), "--checkpoint", str(paths["ckpt"]), "-o", OUT, *seg,
            "--iterstop", "rpnet"]


def _run_engines(d: dict, engines: Path) -> list[str]:
    return [str(d["fixed"]), str(d["moving"]), "--engines", str(engines), "-o", OUT, "--iterstop", "rpnet"]


def _copy_engines(d: dict, work: Path) -> tuple[Path, dict]:
    engines = work / "engines"
    shutil.copytree(d["engines"], engines)
    return engines, json.loads((engines / "manifest.json").read_text())


def _save_manifest(engines: Path, manifest: dict) -> None:
    (engines / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _image(array_zyx: np.ndarray, path: Path, spacing: float = 1.0, origin: tuple = (0.0, 0.0, 0.0)) -> Path:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing([spacing] * 3)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


def _pairs_csv(work: Path, d: dict, ids: list[str]) -> Path:
    lines = ["fixed,moving,id"] + [f"{d['fixed']},{d['moving']},{i}" for i in ids]
    path = work / "pairs.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- unreadable or unusable images


@case("missing_fixed")
def _missing_fixed(d: dict, work: Path) -> Case:
    p = work / "absent_fixed.nii.gz"
    return Case("iirp-run", _run(d, fixed=p), r"fixed image not found", (str(p),))


@case("missing_moving")
def _missing_moving(d: dict, work: Path) -> Case:
    p = work / "absent_moving.nii.gz"
    return Case("iirp-run", _run(d, moving=p), r"moving image not found", (str(p),))


@case("fixed_is_folder")
def _fixed_is_folder(d: dict, work: Path) -> Case:
    p = work / "a_folder.nii.gz"
    p.mkdir()
    return Case("iirp-run", _run(d, fixed=p), r"fixed image is not a file", (str(p),))


@case("random_bytes")
def _random_bytes(d: dict, work: Path) -> Case:
    p = work / "random.nii.gz"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return Case("iirp-run", _run(d, fixed=p), r"cannot read fixed image", (str(p),))


@case("empty_file")
def _empty_file(d: dict, work: Path) -> Case:
    p = work / "empty.nii.gz"
    p.write_bytes(b"")
    return Case("iirp-run", _run(d, moving=p), r"cannot read moving image", (str(p),))


@case("truncated_header")
def _truncated_header(d: dict, work: Path) -> Case:
    p = work / "truncated_header.nii.gz"
    p.write_bytes(gzip.compress(gzip.decompress(d["fixed"].read_bytes())[:200]))
    return Case("iirp-run", _run(d, fixed=p), r"cannot read fixed image", (str(p),))


@case("truncated_gzip")
def _truncated_gzip(d: dict, work: Path) -> Case:
    raw = d["fixed"].read_bytes()
    p = work / "truncated.nii.gz"
    p.write_bytes(raw[: len(raw) // 2])
    return Case("iirp-run", _run(d, fixed=p), r"cannot read fixed image .*truncated or corrupt", (str(p),))


@case("truncated_nii")
def _truncated_nii(d: dict, work: Path) -> Case:
    raw = gzip.decompress(d["moving"].read_bytes())
    p = work / "truncated.nii"
    p.write_bytes(raw[: len(raw) // 2])
    return Case("iirp-run", _run(d, moving=p), r"moving image .*truncated \(voxel data", (str(p),))


@case("nifti_magic_overwritten")
def _nifti_magic(d: dict, work: Path) -> Case:
    raw = bytearray(gzip.decompress(d["fixed"].read_bytes()))
    raw[344:348] = b"XXXX"  # ITK would read an Analyze 7.5 file and drop origin and direction
    p = work / "bad_magic.nii"
    p.write_bytes(bytes(raw))
    return Case("iirp-run", _run(d, fixed=p), r"cannot read fixed image .*not a single-file NIfTI-1 \(magic",
                (str(p),))


@case("image_2d")
def _image_2d(d: dict, work: Path) -> Case:
    p = write_array(blob((15.5, 15.5), shape=(32, 32)), work / "flat.nii.gz")
    return Case("iirp-run", _run(d, fixed=p), r"must be 3D, got 2D", (str(p),))


@case("image_4d")
def _image_4d(d: dict, work: Path) -> Case:
    vol = blob((15.5, 15.5, 15.5))
    p = write_array(np.stack([vol, vol]), work / "series.nii.gz")
    return Case("iirp-run", _run(d, moving=p), r"must be 3D, got 4D", (str(p),))


@case("vector_image")
def _vector_image(d: dict, work: Path) -> Case:
    vol = blob((15.5, 15.5, 15.5))
    p = write_array(np.stack([vol, vol, vol], axis=-1), work / "vector.nii.gz", is_vector=True)
    return Case("iirp-run", _run(d, fixed=p), r"must be scalar, got 3 components", (str(p),))


@case("complex_nifti")
def _complex_nifti(d: dict, work: Path) -> Case:
    vol = blob((15.5, 15.5, 15.5))
    p = work / "complex.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray((vol + 1j * vol).astype(np.complex64)), str(p))
    return Case("iirp-run", _run(d, moving=p), r"moving image .* must be a real-valued image, got complex", (str(p),))


@case("complex_mha")
def _complex_mha(d: dict, work: Path) -> Case:
    vol = blob((15.5, 15.5, 15.5))
    p = work / "complex.mha"
    sitk.WriteImage(sitk.GetImageFromArray((vol + 1j * vol).astype(np.complex64)), str(p))
    return Case("iirp-run", _run(d, fixed=p), r"fixed image .* must be (scalar|a real-valued image)", (str(p),))


@case("sheared_direction")
def _sheared(d: dict, work: Path) -> Case:
    p = work / "sheared.mha"
    sitk.WriteImage(sitk.GetImageFromArray(blob((15.5, 15.5, 15.5))), str(p))
    text = p.read_bytes().replace(b"TransformMatrix = 1 0 0 0 1 0 0 0 1", b"TransformMatrix = 1 0.23 0 0 1 0 0 0 1")
    p.write_bytes(text)
    return Case("iirp-run", _run(d, fixed=p), r"fixed image .* has sheared \(non-orthonormal\) direction cosines",
                (str(p),))


@case("zeros")
def _zeros(d: dict, work: Path) -> Case:
    p = write_array(np.zeros(SIZE, np.float32), work / "zeros.nii.gz")
    return Case("iirp-run", _run(d, fixed=p), r"empty or constant", (str(p),))


@case("constant")
def _constant(d: dict, work: Path) -> Case:
    p = write_array(np.full(SIZE, 7.0, np.float32), work / "seven.nii.gz")
    return Case("iirp-run", _run(d, moving=p), r"empty or constant", (str(p),))


def _with(value: float, *where: tuple[int, int, int]) -> np.ndarray:
    vol = blob((15.5, 15.5, 15.5))
    for w in where:
        vol[w] = value
    return vol


@case("nan")
def _nan(d: dict, work: Path) -> Case:
    p = write_array(_with(np.nan, (3, 4, 5), (10, 10, 10)), work / "nan.nii.gz")
    return Case("iirp-run", _run(d, fixed=p), r"NaN/Inf values in 2 voxel", (str(p),))


@case("inf")
def _inf(d: dict, work: Path) -> Case:
    p = write_array(_with(np.inf, (3, 4, 5)), work / "inf.nii.gz")
    return Case("iirp-run", _run(d, moving=p), r"NaN/Inf values in 1 voxel", (str(p),))


@case("neg_inf")
def _neg_inf(d: dict, work: Path) -> Case:
    p = write_array(_with(-np.inf, (0, 0, 0)), work / "neginf.nii.gz")
    return Case("iirp-run", _run(d, fixed=p), r"NaN/Inf values in", (str(p),))


@case("nan_nrrd")
def _nan_nrrd(d: dict, work: Path) -> Case:
    p = write_array(_with(np.nan, (3, 4, 5)), work / "nan.nrrd")
    return Case("iirp-run", _run(d, fixed=p), r"NaN/Inf values in 1 voxel", (str(p),))


@case("inf_mha")
def _inf_mha(d: dict, work: Path) -> Case:
    p = write_array(_with(np.inf, (3, 4, 5)), work / "inf.mha")
    return Case("iirp-run", _run(d, moving=p), r"NaN/Inf values in 1 voxel", (str(p),))


# --------------------------------------------------------------------------- images that do not overlap


@case("moving_elsewhere_in_space")
def _moving_far(d: dict, work: Path) -> Case:
    p = _image(blob((14.0, 17.0, 15.0)), work / "far.nii.gz", origin=(5000.0, 0.0, 0.0))
    return Case("iirp-run", _run(d, moving=p, seg=None), r"moving image .* does not overlap the fixed image", (str(p),))


@case("moving_spacing_1000mm")
def _moving_huge_spacing(d: dict, work: Path) -> Case:
    p = _image(blob((14.0, 17.0, 15.0)), work / "huge_spacing.nii.gz", spacing=1000.0)
    return Case("iirp-run", _run(d, moving=p, seg=None), r"moving image .* does not overlap the fixed image", (str(p),))


@case("moving_seg_elsewhere")
def _seg_far(d: dict, work: Path) -> Case:
    p = _image(label_volume(), work / "far_seg.nii.gz", origin=(0.0, 0.0, -4000.0))
    return Case("iirp-run", _run(d, seg=p), r"moving label map does not overlap moving image")


@case("initial_transform_singular")
def _singular(d: dict, work: Path) -> Case:
    t = sitk.AffineTransform(3)
    t.SetMatrix([1, 0, 0, 0, 1, 0, 0, 0, 0])
    p = work / "singular.tfm"
    sitk.WriteTransform(t, str(p))
    return Case("iirp-run", _run(d) + ["--initial-transform", str(p)], r"initial transform .* is singular", (str(p),))


@case("initial_transform_bspline")
def _bspline(d: dict, work: Path) -> Case:
    p = work / "bspline.tfm"
    sitk.WriteTransform(sitk.BSplineTransform(3), str(p))
    return Case("iirp-run", _run(d) + ["--initial-transform", str(p)],
                r"initial transform .* must be linear \(rigid or affine\), got a BSplineTransform", (str(p),))


@case("initial_transform_missing")
def _transform_missing(d: dict, work: Path) -> Case:
    p = work / "absent.tfm"
    return Case("iirp-run", _run(d) + ["--initial-transform", str(p)], r"initial transform not found", (str(p),))


# --------------------------------------------------------------------------- checkpoints


@case("ckpt_missing")
def _ckpt_missing(d: dict, work: Path) -> Case:
    p = work / "absent.pt"
    return Case("iirp-run", _run(d, ckpt=p), r"checkpoint not found", (str(p),))


@case("ckpt_garbage")
def _ckpt_garbage(d: dict, work: Path) -> Case:
    p = work / "garbage.pt"
    p.write_bytes(b"not a torch file at all" * 50)
    return Case("iirp-run", _run(d, ckpt=p), r"cannot be read as a weights-only torch file", (str(p),))


@case("ckpt_key_removed")
def _ckpt_key_removed(d: dict, work: Path) -> Case:
    state = dict(d["state"])
    del state["decoder3.Conv2.main.bias"]
    p = work / "key_removed.pt"
    torch.save(state, p)
    return Case("iirp-run", _run(d, ckpt=p), r"does not match RP-Net.*missing keys", (str(p), "decoder3.Conv2.main.bias"))


@case("ckpt_wrong_shape")
def _ckpt_wrong_shape(d: dict, work: Path) -> Case:
    state = dict(d["state"])
    state["encoder.block2.main.weight"] = torch.zeros(16, 8, 1, 1, 1)
    p = work / "wrong_shape.pt"
    torch.save({"config": {"size": SIZE}, "model_state": state}, p)
    return Case("iirp-run", _run(d, ckpt=p), r"shape mismatch", (str(p), "encoder.block2.main.weight"))


class _Arbitrary:
    pass


class _RunsCode:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("echo this must never run",))


@case("ckpt_arbitrary_object")
def _ckpt_object(d: dict, work: Path) -> Case:
    p = work / "object.pt"
    torch.save({"config": {"size": SIZE}, "model_state": d["state"], "extra": _Arbitrary()}, p)
    return Case("iirp-run", _run(d, ckpt=p), r"weights-only torch file: it needs the Python global .*_Arbitrary",
                (str(p),))


@case("ckpt_code_executing_pickle")
def _ckpt_code(d: dict, work: Path) -> Case:
    p = work / "runs_code.pt"
    torch.save({"config": {"size": SIZE}, "model_state": d["state"], "payload": _RunsCode()}, p)
    return Case("iirp-run", _run(d, ckpt=p), r"it needs the Python global posix\.system, which is refused", (str(p),))


@case("ckpt_nan_weights")
def _ckpt_nan(d: dict, work: Path) -> Case:
    state = {k: v.clone() for k, v in d["state"].items()}
    state["decoder2.Conv1.main.weight"][0, 0, 0, 0, 0] = float("nan")
    p = work / "nan_weights.pt"
    torch.save({"config": {"size": SIZE}, "model_state": state}, p)
    return Case("iirp-run", _run(d, ckpt=p), r"has NaN/Inf weights in decoder2\.Conv1\.main\.weight", (str(p),))


@case("ckpt_overflowing_weights")
def _ckpt_overflow(d: dict, work: Path) -> Case:
    """Finite weights whose flow overflows to Inf/NaN: the flow check, not the weight check, catches it."""
    state = {k: v.clone() for k, v in d["state"].items()}
    for key in ("decoder4.Conv4.weight", "decoder4.Conv5.weight"):
        state[key] = state[key] * 1e30
    p = work / "overflow.pt"
    torch.save({"config": {"size": SIZE}, "model_state": state}, p)
    return Case("iirp-run", _run(d, ckpt=p), r"produced a non-finite (flow|IterStop score)", (str(p),))


@case("ckpt_size_1024_cubed")
def _ckpt_huge(d: dict, work: Path) -> Case:
    p = work / "huge.pt"
    torch.save({"config": {"size": (1024, 1024, 1024)}, "model_state": d["state"]}, p)
    return Case("iirp-run", _run(d, ckpt=p), r"1024x1024x1024 model grid needs at least .* GiB of memory", (str(p),))


@case("export_ckpt_size_1024_cubed")
def _export_huge(d: dict, work: Path) -> Case:
    p = work / "huge.pt"
    torch.save({"config": {"size": (1024, 1024, 1024)}, "model_state": d["state"]}, p)
    return Case("iirp-export", [str(p), "-o", OUT], r"needs at least .* GiB of memory", (str(p),))


@case("export_ckpt_nan_weights")
def _export_nan(d: dict, work: Path) -> Case:
    state = {k: v.clone() for k, v in d["state"].items()}
    state["encoder.block1.main.bias"][0] = float("inf")
    p = work / "inf_weights.pt"
    torch.save(state, p)
    return Case("iirp-export", [str(p), "-o", OUT, "--shape", "32", "32", "32"], r"NaN/Inf weights", (str(p),))


# --------------------------------------------------------------------------- engine folders


@case("engines_without_manifest")
def _no_manifest(d: dict, work: Path) -> Case:
    return Case("iirp-run", _run_engines(d, work), r"manifest\.json not found")


@case("manifest_stages_is_a_list")
def _stages_list(d: dict, work: Path) -> Case:
    engines, manifest = _copy_engines(d, work)
    manifest["stages"] = list(manifest["stages"].values())
    _save_manifest(engines, manifest)
    return Case("iirp-run", _run_engines(d, engines), r"'stages' must be a dict, got list")


@case("manifest_path_outside_folder")
def _stage_outside(d: dict, work: Path) -> Case:
    engines, manifest = _copy_engines(d, work)
    manifest["stages"]["flow_estimator_1"]["file"] = "../../engines/flow_estimator_1.onnx"
    _save_manifest(engines, manifest)
    return Case("iirp-run", _run_engines(d, engines), r"'file' must be a plain file name inside the engine folder")


@case("manifest_stage_is_a_link_outside")
def _stage_link(d: dict, work: Path) -> Case:
    engines, manifest = _copy_engines(d, work)
    outside = work / "elsewhere.onnx"
    shutil.move(engines / "flow_estimator_1.onnx", outside)
    (engines / "flow_estimator_1.onnx").symlink_to(outside)
    return Case("iirp-run", _run_engines(d, engines), r"is a link to a file outside the folder")


@case("manifest_not_json")
def _manifest_garbage(d: dict, work: Path) -> Case:
    engines, _ = _copy_engines(d, work)
    (engines / "manifest.json").write_bytes(b"\x00\xff{not json")
    return Case("iirp-run", _run_engines(d, engines), r"manifest\.json is not valid JSON")


@case("manifest_grid_not_multiple_of_8")
def _manifest_grid(d: dict, work: Path) -> Case:
    engines, manifest = _copy_engines(d, work)
    manifest["model_grid"]["size"] = [30, 32, 32]
    _save_manifest(engines, manifest)
    return Case("iirp-run", _run_engines(d, engines), r"model_grid size must be 3 multiples of 8")


@case("engine_file_altered")
def _engine_altered(d: dict, work: Path) -> Case:
    engines, _ = _copy_engines(d, work)
    with open(engines / "flow_estimator_2.onnx", "ab") as fh:
        fh.write(b"\0")
    return Case("iirp-run", _run_engines(d, engines), r"flow_estimator_2\.onnx .* does not match the manifest's sha256")


# --------------------------------------------------------------------------- options


def _option_case(d: dict, option: str, value: str, pattern: str) -> Case:
    return Case("iirp-run", _run(d) + [option, value], pattern)


for _spec in ["bogus", "fixed:1,2,3", "fixed:1,2,3,4,5", "fixed:a,b,c,d", "fixed:-1,1,1,1", "fixed", ""]:
    case(f"iterstop_{_spec or 'empty'}")(
        lambda d, w, s=_spec: _option_case(d, "--iterstop", s, rf"iterstop spec {re.escape(repr(s))}"))

for _spec in ["bogus", "percentile:5", "percentile:99,1", "percentile:1,101", "window:10,1", "window:a,b",
              "window:nan,1", "minmax:1,2"]:
    case(f"intensity_{_spec}")(
        lambda d, w, s=_spec: _option_case(d, "--intensity", s, rf"intensity spec {re.escape(repr(s))}"))


@case("iterstop_fixed_above_max_iters")
def _fixed_cap(d: dict, work: Path) -> Case:
    return Case("iirp-run", _run(d) + ["--iterstop", "fixed:100000,0,0,0", "--max-iters", "10"],
                r"100000 passes at one level exceed max_iters 10")


@case("delta_negative")
def _delta_negative(d: dict, work: Path) -> Case:
    return _option_case(d, "--delta", "-0.1", r"iterstop 'delta' must be a finite number >= 0, got -0\.1")


@case("delta_nan")
def _delta_nan(d: dict, work: Path) -> Case:
    return _option_case(d, "--delta", "nan", r"iterstop 'delta' must be a finite number >= 0, got nan")


@case("delta_not_a_number")
def _delta_abc(d: dict, work: Path) -> Case:
    return _option_case(d, "--delta", "abc", r"Invalid value for '--delta'.*(valid float|valid number).*\(see iirp-run --help\)")


@case("spacing_not_positive")
def _spacing_zero(d: dict, work: Path) -> Case:
    return _option_case(d, "--spacing", "0", r"--spacing must be a positive number of mm, got \(0\.0, 0\.0, 0\.0\)")


@case("spacing_contradicts_the_engines")
def _spacing_contradicts(d: dict, work: Path) -> Case:
    return Case("iirp-run", _run_engines(d, d["engines"]) + ["--spacing", "2"],
                r"--spacing 2 mm contradicts the model, which was trained on a 1 mm grid")


@case("export_spacing_not_positive")
def _export_spacing(d: dict, work: Path) -> Case:
    return Case("iirp-export", [str(d["ckpt"]), "-o", OUT, "--spacing", "-1"], r"'spacing' \(--spacing\) must be positive")


@case("engine_device_mismatch")
def _engine_device(d: dict, work: Path) -> Case:
    return Case("iirp-run", _run_engines(d, d["engines"]) + ["--engine", "openvino", "--device", "cuda"],
                r"engine 'openvino' runs on the CPU, not on cuda:0")


@case("max_iters_zero")
def _max_iters(d: dict, work: Path) -> Case:
    return _option_case(d, "--max-iters", "0", r"iterstop 'max_iters' must be an integer >= 1, got 0")


@case("option_without_value")
def _no_value(d: dict, work: Path) -> Case:
    return Case("iirp-run", [str(d["fixed"]), str(d["moving"]), "-o", OUT, "--engines"],
                r"Option '--engines' requires an argument")


@case("unknown_option")
def _unknown_option(d: dict, work: Path) -> Case:
    return Case("iirp-run", _run(d) + ["--fast"], r"No such option: --fast")


@case("window_outside_image_range")
def _window(d: dict, work: Path) -> Case:
    return _option_case(d, "--intensity", "window:1000,2000",
                        r"fixed image .*constant under intensity rule 'window:1000,2000'")


@case("checkpoint_and_engines_missing")
def _no_model(d: dict, work: Path) -> Case:
    return Case("iirp-run", [str(d["fixed"]), str(d["moving"]), "-o", OUT],
                r"give exactly one of --checkpoint CKPT or --engines DIR")


@case("checkpoint_and_engines_together")
def _both_models(d: dict, work: Path) -> Case:
    return Case("iirp-run", _run(d) + ["--engines", str(d["engines"])],
                r"give exactly one of --checkpoint CKPT or --engines DIR")


@case("ort_needs_engines")
def _ort_ckpt(d: dict, work: Path) -> Case:
    return _option_case(d, "--engine", "ort", r"engine 'ort' needs --engines DIR")


@case("unknown_engine")
def _bad_engine(d: dict, work: Path) -> Case:
    return _option_case(d, "--engine", "nonesuch", r"engine 'nonesuch' needs --engines DIR")


@case("unknown_device")
def _bad_device(d: dict, work: Path) -> Case:
    return _option_case(d, "--device", "tpu", r"device must be 'cpu' or 'cuda\[:N\]', got 'tpu'")


@case("affine_and_initial_transform")
def _affine_both(d: dict, work: Path) -> Case:
    t = work / "t.tfm"
    sitk.WriteTransform(sitk.Transform(3, sitk.sitkIdentity), str(t))
    return Case("iirp-run", _run(d) + ["--affine", "--initial-transform", str(t)], r"--affine.*--initial-transform")


@case("no_images")
def _no_images(d: dict, work: Path) -> Case:
    return Case("iirp-run", ["--checkpoint", str(d["ckpt"]), "-o", OUT], r"give FIXED and MOVING images")


# --------------------------------------------------------------------------- labels


@case("seg_missing")
def _seg_missing(d: dict, work: Path) -> Case:
    p = work / "absent_seg.nii.gz"
    return Case("iirp-run", _run(d, seg=p), r"moving-seg image not found", (str(p),))


@case("seg_corrupt")
def _seg_corrupt(d: dict, work: Path) -> Case:
    p = work / "seg_garbage.nii.gz"
    p.write_bytes(b"\x00\x01garbage" * 100)
    return Case("iirp-run", _run(d, seg=p), r"cannot read moving-seg image", (str(p),))


@case("seg_2d")
def _seg_2d(d: dict, work: Path) -> Case:
    p = write_array(np.ones((32, 32), np.int16), work / "seg2d.nii.gz")
    return Case("iirp-run", _run(d, seg=p), r"must be 3D, got 2D", (str(p),))


# --------------------------------------------------------------------------- output folders


@case("out_empty_string")
def _out_empty(d: dict, work: Path) -> Case:
    argv = _run(d)
    argv[argv.index(OUT)] = ""
    return Case("iirp-run", argv, r"missing output folder: -o/--out is empty")


@case("out_missing")
def _out_missing(d: dict, work: Path) -> Case:
    argv = _run(d)
    i = argv.index("-o")
    return Case("iirp-run", argv[:i] + argv[i + 2:], r"missing option -o/--out")


@case("out_is_proc")
def _out_proc(d: dict, work: Path) -> Case:
    argv = _run(d)
    argv[argv.index(OUT)] = "/proc"
    return Case("iirp-run", argv, r"output folder /proc is not writable")


@case("out_under_sys")
def _out_sys(d: dict, work: Path) -> Case:
    argv = _run(d)
    argv[argv.index(OUT)] = "/sys/iirp-out"
    return Case("iirp-run", argv, r"output folder /sys/iirp-out cannot be created: /sys is not writable")


@case("out_parent_is_a_file")
def _out_parent_file(d: dict, work: Path) -> Case:
    blocker = work / "blocker"
    blocker.write_text("I am a file\n")
    argv = _run(d)
    argv[argv.index(OUT)] = str(blocker / "sub" / "out")
    return Case("iirp-run", argv, r"output folder .* cannot be created: .* is not a folder", (str(blocker),))


@case("out_is_a_file")
def _out_file(d: dict, work: Path) -> Case:
    target = work / "a_file"
    target.write_text("a file where the folder should go\n")
    argv = _run(d)
    argv[argv.index(OUT)] = str(target)
    return Case("iirp-run", argv, r"exists and is not a folder", (str(target),))


def _previous_run(work: Path) -> Path:
    out = work / "previous"
    out.mkdir()
    for name in ("warped.nii.gz", "displacement.nii.gz", "report.json", "affine.tfm", "qc.png"):
        (out / name).write_bytes(b"an earlier run's " + name.encode())
    return out


@case("out_holds_an_earlier_run")
def _out_earlier(d: dict, work: Path) -> Case:
    out = _previous_run(work)
    argv = _run(d)
    argv[argv.index(OUT)] = str(out)
    return Case("iirp-run", argv, r"output folder .* is not empty \(.*\); pass --overwrite", (str(out),))


@case("overwrite_with_foreign_files")
def _overwrite_foreign(d: dict, work: Path) -> Case:
    out = _previous_run(work)
    (out / "notes.txt").write_text("mine\n")
    argv = _run(d) + ["--overwrite"]
    argv[argv.index(OUT)] = str(out)
    return Case("iirp-run", argv, r"holds files this command does not write \(notes\.txt\)", (str(out),))


@case("output_error_before_model_loading")
def _out_first(d: dict, work: Path) -> Case:
    blocker = work / "blocker"
    blocker.write_text("x")
    argv = _run(d, ckpt=work / "absent.pt")
    argv[argv.index(OUT)] = str(blocker / "o")
    return Case("iirp-run", argv, r"output folder")


@case("short_write_file_size_limit")
def _short_write(d: dict, work: Path) -> Case:
    """``ulimit -f``: SimpleITK does not report a short write; the size check does."""
    return Case("iirp-run", _run(d), r"cannot write (warped|displacement|warped_seg)\.nii\.gz.*"
                r"(short write|file too large)", fsize_limit=300 * 1024)


# --------------------------------------------------------------------------- cohorts


for _id, _pattern in [("..", r"id '\.\.' must not be empty or start with '\.'"),
                      (".", r"id '\.' must not be empty or start with '\.'"),
                      (".hidden", r"id '\.hidden' must not be empty or start with '\.'"),
                      ("summary.csv", r"id 'summary\.csv' is reserved"),
                      ("SUMMARY.CSV", r"id 'SUMMARY\.CSV' is reserved"),
                      ("summary.1-of-2.csv", r"id 'summary\.1-of-2\.csv' is reserved")]:
    case(f"cohort_id_{_id}")(lambda d, w, i=_id, pat=_pattern: Case(
        "iirp-run", ["--pairs", str(_pairs_csv(w, d, ["ok", i])), "--checkpoint", str(d["ckpt"]), "-o", OUT], pat))


@case("cohort_duplicate_ids_ignoring_case")
def _cohort_dup(d: dict, work: Path) -> Case:
    return Case("iirp-run", ["--pairs", str(_pairs_csv(work, d, ["a", "A"])), "--checkpoint", str(d["ckpt"]),
                             "-o", OUT], r"duplicate id 'A' \(ids must differ also ignoring case\)")


@case("cohort_csv_missing")
def _cohort_missing(d: dict, work: Path) -> Case:
    p = work / "absent.csv"
    return Case("iirp-run", ["--pairs", str(p), "--checkpoint", str(d["ckpt"]), "-o", OUT], r"pairs file .* not found",
                (str(p),))


@case("cohort_out_not_empty")
def _cohort_out(d: dict, work: Path) -> Case:
    out = work / "cohort"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    return Case("iirp-run", ["--pairs", str(_pairs_csv(work, d, ["a"])), "--checkpoint", str(d["ckpt"]),
                             "-o", str(out)], r"cohort output folder .* is not empty")


def _cohort(d: dict, work: Path, *extra: str) -> list[str]:
    return ["--pairs", str(_pairs_csv(work, d, ["a", "b"])), "--checkpoint", str(d["ckpt"]), "-o", OUT, *extra]


for _name, _extra, _pattern in [
    ("shard_3_of_2", ["--shard", "3/2"], r"--shard must be I/N with 1 <= I <= N, got 3/2"),
    ("shard_0_of_2", ["--shard", "0/2"], r"--shard must be I/N with 1 <= I <= N, got 0/2"),
    ("shard_not_a_fraction", ["--shard", "x"], r"--shard must be I/N with 1 <= I <= N \(e.g. 2/8\), got 'x'"),
    ("resume_with_overwrite", ["--resume", "--overwrite"], r"use either --resume .* or --overwrite .*, not both"),
    ("workers_without_ray", ["--workers", "2"], r"--workers needs --ray"),
    ("ray_workers_zero", ["--ray", "local", "--workers", "0"], r"--workers must be >= 1, got 0"),
    ("ray_gpus_per_worker_2", ["--ray", "local", "--gpus-per-worker", "2", "--device", "cuda"],
     r"--gpus-per-worker must be between 0 and 1"),
    ("ray_gpus_without_cuda", ["--ray", "local", "--gpus-per-worker", "1"], r"--gpus-per-worker 1 needs --device cuda"),
    ("ray_device_cuda_1", ["--ray", "local", "--gpus-per-worker", "1", "--device", "cuda:1"],
     r"--device cuda:1 with --ray: Ray chooses each worker's GPU; use --device cuda"),
    ("ray_cuda_without_gpus", ["--ray", "local", "--device", "cuda"],
     r"--device cuda with --ray needs --gpus-per-worker G > 0"),
    ("ray_cpus_per_worker_zero", ["--ray", "local", "--cpus-per-worker", "0"], r"--cpus-per-worker must be > 0"),
    ("ray_unreachable_address", ["--ray", "127.0.0.1:1"],
     r"cannot connect to the Ray cluster at '127.0.0.1:1': nothing answers at 127.0.0.1:1"),
]:
    case(f"cohort_{_name}")(lambda d, w, e=_extra, pat=_pattern: Case("iirp-run", _cohort(d, w, *e), pat))


@case("cohort_options_without_pairs")
def _cohort_options_without_pairs(d: dict, work: Path) -> Case:
    return Case("iirp-run", _run(d) + ["--resume", "--shard", "1/2"], r"--resume, --shard: cohort options, for --pairs")


@case("merge_without_shard_summaries")
def _merge_nothing(d: dict, work: Path) -> Case:
    return Case("iirp-run", ["--merge-summaries", OUT],
                r"cohort output folder .* (not found|holds no shard summaries \(summary.<i>-of-<n>.csv\))")


def _shard_summaries(work: Path, shards: dict[str, str]) -> Path:
    out = work / "sharded"
    out.mkdir()
    for name, text in shards.items():
        (out / name).write_text(text)
    return out


@case("merge_missing_shard")
def _merge_missing(d: dict, work: Path) -> Case:
    out = _shard_summaries(work, {"summary.1-of-3.csv": "id,status\na,ok\n", "summary.3-of-3.csv": "id,status\nc,ok\n"})
    return Case("iirp-run", ["--merge-summaries", str(out)], r"shard 2/3 missing \(no summary.2-of-3.csv\)",
                (str(out),))


@case("merge_overlapping_shards")
def _merge_overlap(d: dict, work: Path) -> Case:
    out = _shard_summaries(work, {"summary.1-of-2.csv": "id,status\na,ok\n", "summary.2-of-2.csv": "id,status\nA,ok\n"})
    return Case("iirp-run", ["--merge-summaries", str(out)], r"pair 'A' is in shards 1/2 and 2/2: the summaries overlap")


@case("merge_unfinished_shard")
def _merge_pending(d: dict, work: Path) -> Case:
    out = _shard_summaries(work, {"summary.1-of-2.csv": "id,status\na,ok\n",
                                  "summary.2-of-2.csv": "id,status\nb,pending\n"})
    return Case("iirp-run", ["--merge-summaries", str(out)], r"shard 2/2 has not finished .*--shard 2/2 --resume")


@case("merge_with_other_options")
def _merge_other(d: dict, work: Path) -> Case:
    return Case("iirp-run", ["--merge-summaries", OUT, "--pairs", str(_pairs_csv(work, d, ["a"]))],
                r"--merge-summaries takes only the cohort folder")


@case("cohort_shard_into_other_split")
def _shard_other_split(d: dict, work: Path) -> Case:
    out = _shard_summaries(work, {"summary.1-of-3.csv": "id,status\na,ok\n"})
    argv = _cohort(d, work, "--shard", "1/2")
    argv[argv.index(OUT)] = str(out)
    return Case("iirp-run", argv, r"holds summaries of a split into another number of shards \(summary.1-of-3.csv\)")


# --------------------------------------------------------------------------- iirp-export, iirp-bench, iirp-train


@case("export_missing_checkpoint")
def _export_missing(d: dict, work: Path) -> Case:
    p = work / "absent.pt"
    return Case("iirp-export", [str(p), "-o", OUT], r"checkpoint not found", (str(p),))


@case("export_bad_shape")
def _export_shape(d: dict, work: Path) -> Case:
    return Case("iirp-export", [str(d["ckpt"]), "-o", OUT, "--shape", "16", "20", "32"],
                r"'shape' \(--shape\) must be 3 multiples of 8")


@case("export_shape_not_a_number")
def _export_shape_text(d: dict, work: Path) -> Case:
    return Case("iirp-export", [str(d["ckpt"]), "-o", OUT, "--shape", "16", "x", "32"], r"Invalid value for '--shape'")


@case("bench_latency_repeats_zero")
def _bench_repeats(d: dict, work: Path) -> Case:
    return Case("iirp-bench", ["latency", "--engines", str(d["engines"]), "--repeats", "0", "-o", OUT],
                r"'repeats' \(--repeats\) must be an integer >= 1, got 0")


@case("bench_latency_warmup_negative")
def _bench_warmup(d: dict, work: Path) -> Case:
    return Case("iirp-bench", ["latency", "--engines", str(d["engines"]), "--warmup", "-1", "-o", OUT],
                r"'warmup' \(--warmup\) must be an integer >= 0, got -1")


@case("bench_unknown_subcommand")
def _bench_sub(d: dict, work: Path) -> Case:
    return Case("iirp-bench", ["speed", "-o", OUT], r"No such command 'speed'")


@case("train_shape_1024_cubed")
def _train_huge(d: dict, work: Path) -> Case:
    return Case("iirp-train", [str(d["fixed"]), "-o", OUT, "--shape", "1024", "1024", "1024"],
                r"needs at least .* GiB of memory")


@case("train_steps_zero")
def _train_steps(d: dict, work: Path) -> Case:
    return Case("iirp-train", [str(d["fixed"]), "-o", OUT, "--shape", "32", "32", "32", "--steps", "0"],
                r"--steps must be >= 1, got 0")


# --------------------------------------------------------------------------- the test


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its content (None for folders, the target for links)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = os.readlink(path).encode()
            elif os.path.isdir(path):
                out[rel] = None
            else:
                out[rel] = Path(path).read_bytes()
    return out


def _invoke(c: Case, argv: list[str]) -> tuple[int, str, str]:
    """Run the command; returns exit code, stdout, stderr."""
    if c.fsize_limit is None:
        result = CliRunner().invoke(APPS[c.prog], argv)
        return result.exit_code, result.stdout, result.stderr
    app = {"iirp-run": "run_app", "iirp-export": "export_app", "iirp-bench": "bench_app", "iirp-train": "train_app"}
    code = f"import sys; from iirp.cli import {app[c.prog]} as app; sys.argv[0] = {c.prog!r}; app()"
    limit = c.fsize_limit

    def _limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, preexec_fn=_limit,
                          env=env, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("out_state", ["absent", "empty"])
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, out_state: str, data: dict, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    c = CASES[name](data, work)
    out = tmp_path / "out"
    if out_state == "empty":
        out.mkdir()
    argv = [str(out) if a == OUT else a for a in c.argv]
    before = _snapshot(tmp_path)

    code, stdout, stderr = _invoke(c, argv)

    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, f"exit {code}; stderr={stderr!r}; stdout={stdout!r}"
    assert len(lines) == 1, f"expected one line on stderr, got {stderr!r}"
    prefix = f"{c.prog}: error: "
    assert lines[0].startswith(prefix), lines[0]
    line = lines[0][len(prefix):]
    assert re.search(c.pattern, line), f"{c.pattern!r} not found in {line!r}"
    for needle in c.needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert not stdout.strip(), stdout
    assert _snapshot(tmp_path) == before


def test_every_issue_case_is_catalogued() -> None:
    """The twenty robustness bugs of issue 14 each have a case here (a guard against dropping one)."""
    expected = {
        "short_write_file_size_limit", "cohort_id_..", "cohort_id_.", "ckpt_size_1024_cubed", "out_holds_an_earlier_run",
        "cohort_id_summary.csv", "sheared_direction", "ckpt_nan_weights", "ckpt_overflowing_weights",
        "complex_nifti", "moving_spacing_1000mm", "initial_transform_singular", "moving_seg_elsewhere",
        "manifest_stages_is_a_list", "bench_latency_repeats_zero", "nifti_magic_overwritten", "delta_not_a_number",
        "ckpt_code_executing_pickle", "iterstop_fixed_above_max_iters", "initial_transform_bspline",
        "out_empty_string", "manifest_path_outside_folder", "out_is_proc",
    }
    assert expected <= set(CASES), expected - set(CASES)


def test_verbose_shows_the_traceback_then_the_line(data: dict, tmp_path: Path) -> None:
    missing = tmp_path / "absent.nii.gz"
    out = tmp_path / "out"
    result = CliRunner().invoke(run_app, _run(data, fixed=missing)[:4] + ["-o", str(out), "--verbose"])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"iirp-run: error: fixed image not found: {missing}"
    assert not out.exists()


def test_unexpected_errors_are_one_line(data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug (any exception that is not an IirpError) still reaches the user as one line, exit 2."""
    import iirp.runtime.register as register

    def _boom(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug deep inside")

    monkeypatch.setattr(register, "displacement_field", _boom)
    out = tmp_path / "out"
    result = CliRunner().invoke(run_app, [a.replace(OUT, str(out)) for a in _run(data)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.match(r"iirp-run: error: unexpected ZeroDivisionError in _boom \(test_bad_inputs\.py:\d+\): "
                    r"a bug deep inside \(rerun with --verbose for the traceback\)", lines[0]), lines[0]
    assert not out.exists()


def _sheared_sform_nifti(source: Path, target: Path) -> Path:
    """A NIfTI whose only orientation is a sheared sform: ITK prints a WARNING from C++, then refuses it."""
    import struct

    raw = bytearray(gzip.decompress(source.read_bytes()))
    raw[252:254] = (0).to_bytes(2, "little")  # qform_code 0: the sform is all there is
    srow = list(struct.unpack("<12f", raw[280:328]))
    srow[1] = 0.3  # shear x by y
    raw[280:328] = struct.pack("<12f", *srow)
    target.write_bytes(bytes(raw))
    return target


@pytest.mark.parametrize("verbose", [False, True])
def test_library_warnings_stay_off_stderr(verbose: bool, data: dict, tmp_path: Path) -> None:
    """ITK writes its warnings from C++ straight to stderr: they are routed to the log, shown with --verbose."""
    fixed = _sheared_sform_nifti(data["fixed"], tmp_path / "sheared_sform.nii")
    out = tmp_path / "out"
    code = textwrap.dedent("""
        import sys
        from iirp.cli import run_app
        sys.argv[0] = "iirp-run"
        run_app()
    """)
    argv = [str(fixed), str(data["moving"]), "--checkpoint", str(data["ckpt"]), "-o", str(out)]
    proc = subprocess.run([sys.executable, "-c", code, *argv, *(["--verbose"] if verbose else [])],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"iirp-run: error: cannot read fixed image {fixed}"), lines
    if verbose:
        assert any("unexpected scales in sform" in ln for ln in lines), proc.stderr
    else:
        assert len(lines) == 1, proc.stderr
    assert not out.exists()
