"""``iirp-export`` through typer's CliRunner: success output, and errors as one line with exit code 2."""

from __future__ import annotations

import functools
import sys

import pytest
from export_support import STAGE_FILES, Tiny
from typer.testing import CliRunner

import iirp.export
from iirp.cli import export_app
from iirp.manifest import MANIFEST_NAME, Manifest

PREFIX = "iirp-export: error: "


def _invoke(args: list[object]):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(export_app, [str(a) for a in args])


def _stderr(result) -> str:  # type: ignore[no-untyped-def]
    try:
        return result.stderr
    except ValueError:  # older click mixes stderr into output
        return result.output


def _one_error_line(result, *needles: str) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [ln for ln in _stderr(result).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(PREFIX)]
    assert len(errors) == 1 and lines[-1] == errors[0], lines  # progress lines may come before it
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture()
def torchscript_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the CLI's real export with the fast torchscript exporter (the dynamo path is covered elsewhere)."""
    monkeypatch.setattr(iirp.export, "export_checkpoint",
                        functools.partial(iirp.export.export_checkpoint, exporter="torchscript"))


def test_export_success(tiny: Tiny, tmp_path, torchscript_cli: None) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "engines"
    result = _invoke([tiny.ckpt, "-o", out, "--shape", 16, 16, 24, "--precision", "fp16", "--opset", 17,
                      "--verify-pair", tiny.fixed, tiny.moving])
    assert result.exit_code == 0, (result.output, result.exception)
    assert {p.name for p in out.iterdir()} == STAGE_FILES | {MANIFEST_NAME}
    manifest = Manifest.load(out)
    assert (manifest.size, manifest.precision, manifest.opset, manifest.dynamic) == ((16, 16, 24), "fp16", 17, False)
    assert f"wrote {out}: 5 stages, fp16, 16x16x24, opset 17 (torchscript exporter)" in result.stdout
    assert "onnxruntime (CPU) vs PyTorch, fp16" in result.stdout  # the verification table
    assert "flow_estimator_4" in result.stdout and "pair" in result.stdout and "FAIL" not in result.stdout


def test_export_dynamic_without_verify(tiny: Tiny, tmp_path, torchscript_cli: None) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "engines"
    result = _invoke([tiny.ckpt, "-o", out, "--dynamic", "--no-verify"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "fp32, dynamic, opset 18" in result.stdout
    assert "onnxruntime (CPU) vs PyTorch" not in result.stdout
    assert Manifest.load(out).dynamic


def test_trt_without_tensorrt_is_one_line_exit_2(tiny: Tiny, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt now raises ImportError
    out = tmp_path / "engines"
    result = _invoke([tiny.ckpt, "-o", out, "--trt"])
    _one_error_line(result, "--trt needs the TensorRT Python package", "import tensorrt failed",
                    "or export without --trt")
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--shape", 16, 20, 32], ["'shape' (--shape) must be 3 multiples of 8", "(16, 20, 32)"]),
        (["--precision", "bf16"], ["'precision' must be fp32 or fp16, got 'bf16'"]),
        (["--opset", 9], ["'opset' must be an integer from 17"]),
    ],
)
def test_bad_options_are_one_line_exit_2(tiny: Tiny, tmp_path, extra: list, needles: list[str]) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "engines"
    _one_error_line(_invoke([tiny.ckpt, "-o", out, *extra]), *needles)
    assert not out.exists()


def test_bad_checkpoint_is_one_line_exit_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    _one_error_line(_invoke([bad, "-o", tmp_path / "engines"]), "checkpoint", str(bad))
    assert not (tmp_path / "engines").exists()


def test_verification_failure_is_one_line_exit_2(tiny: Tiny, tmp_path, torchscript_cli: None,  # type: ignore[no-untyped-def]
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    import iirp.export.verify as verify

    real = verify.torch_reference
    monkeypatch.setattr(verify, "torch_reference", lambda m, i: [o * np.float32(1.5) for o in real(m, i)])
    out = tmp_path / "engines"
    result = _invoke([tiny.ckpt, "-o", out])
    _one_error_line(result, "exported stages do not match PyTorch (fp32)", "checks failed")
    assert "FAIL" in result.stdout  # the table shows which stage failed
    assert not out.exists()
