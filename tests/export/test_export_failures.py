"""Failures leave nothing half-written: verification mismatch, exporter fallback, bad options, foreign folders."""

from __future__ import annotations

import numpy as np
import pytest
from export_support import Tiny

import iirp.export.onnx_export as onnx_export
import iirp.export.verify as verify
from iirp.errors import CheckpointError, ImageError, OutputError
from iirp.export import ExportError, ExportOptionError, VerificationError, export_checkpoint
from iirp.manifest import MANIFEST_NAME, Manifest


def _leftovers(parent) -> list[str]:  # type: ignore[no-untyped-def]
    return [p.name for p in parent.iterdir() if "iirp-partial" in p.name or "iirp-old" in p.name]


def _perturbed(monkeypatch: pytest.MonkeyPatch, amount: float) -> None:
    real = verify.torch_reference

    def shifted(module, inputs):  # type: ignore[no-untyped-def]
        return [o + np.float32(amount) for o in real(module, inputs)]

    monkeypatch.setattr(verify, "torch_reference", shifted)


def test_mismatch_fails_and_writes_nothing(tiny: Tiny, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    _perturbed(monkeypatch, 1e-2)
    out = tmp_path / "new" / "engines"
    with pytest.raises(VerificationError, match=r"do not match PyTorch \(fp32\): 8 of 8 checks failed; worst: .* > 0.0001"):
        export_checkpoint(tiny.ckpt, out, exporter="torchscript", progress=False)
    assert not out.exists() and not out.parent.exists()
    assert _leftovers(tmp_path) == []


def test_mismatch_keeps_the_previous_export(tiny: Tiny, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "engines"
    first = export_checkpoint(tiny.ckpt, out, exporter="torchscript", verify=False, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _perturbed(monkeypatch, 1e-3)
    with pytest.raises(VerificationError, match=r"worst: .* vs torch fp32"):
        export_checkpoint(tiny.ckpt, out, exporter="torchscript", shape=(16, 16, 16), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert Manifest.load(out) == first
    assert _leftovers(tmp_path) == []


def test_an_earlier_export_is_replaced(tiny: Tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "engines"
    export_checkpoint(tiny.ckpt, out, exporter="torchscript", verify=False, progress=False)
    second = export_checkpoint(tiny.ckpt, out, exporter="torchscript", shape=(16, 16, 24), progress=False)
    assert Manifest.load(out).size == (16, 16, 24) == second.size
    Manifest.load(out).verify_files(out)
    assert _leftovers(tmp_path) == []


def test_dynamo_failure_falls_back_to_torchscript(tiny: Tiny, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    real = onnx_export.export_stage

    def no_dynamo(*args, method: str, **kw):  # type: ignore[no-untyped-def]
        if method == "dynamo":
            raise RuntimeError("simulated dynamo failure\nsecond line")
        return real(*args, method=method, **kw)

    monkeypatch.setattr(onnx_export, "export_stage", no_dynamo)
    manifest = export_checkpoint(tiny.ckpt, tmp_path / "out", verify=False, progress=False)
    assert manifest.exporter["method"] == "torchscript"
    assert manifest.exporter["dynamo_error"] == "dynamo: RuntimeError: simulated dynamo failure"
    Manifest.load(tmp_path / "out").verify_files(tmp_path / "out")


def test_both_exporters_failing_is_an_export_error(tiny: Tiny, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    def broken(*args, method: str, **kw):  # type: ignore[no-untyped-def]
        raise RuntimeError(f"{method} broke")

    monkeypatch.setattr(onnx_export, "export_stage", broken)
    with pytest.raises(ExportError, match=r"ONNX export failed: dynamo: RuntimeError: dynamo broke \| torchscript: "):
        export_checkpoint(tiny.ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": (16, 24)}, r"'shape' \(--shape\) must be 3 multiples of 8, each >= 16, got \(16, 24\)"),
        ({"shape": (16, 20, 32)}, r"must be 3 multiples of 8"),
        ({"shape": (8, 16, 16)}, r"each >= 16"),
        ({"shape": ("a", 16, 16)}, r"'shape' must be 3 integers"),
        ({"precision": "int8"}, r"'precision' must be fp32 or fp16, got 'int8'"),
        ({"opset": 11}, r"'opset' must be an integer from 17 to \d+, got 11"),
        ({"exporter": "jit"}, r"'exporter' must be one of"),
    ],
)
def test_bad_options(tiny: Tiny, tmp_path, kwargs: dict, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ExportOptionError, match=match):
        export_checkpoint(tiny.ckpt, tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*absent.pt"):
        export_checkpoint(tmp_path / "absent.pt", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_verify_pair_image_fails_before_exporting(tiny: Tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ImageError, match=r"moving image .*absent.nii.gz"):
        export_checkpoint(tiny.ckpt, tmp_path / "out", verify_pair=(tiny.fixed, tmp_path / "absent.nii.gz"),
                          progress=False)
    assert not (tmp_path / "out").exists()


def test_folder_with_foreign_files_is_refused(tiny: Tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    (out / MANIFEST_NAME).write_text("{}\n")
    with pytest.raises(OutputError, match=r"holds files an export does not write \(notes.txt\)"):
        export_checkpoint(tiny.ckpt, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "notes.txt"]


def test_a_file_in_the_way_is_refused(tiny: Tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match=r"exists and is not a folder"):
        export_checkpoint(tiny.ckpt, tmp_path / "out", progress=False)


def test_missing_export_tools_is_an_export_error(tiny: Tiny, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # 'import onnxscript' now raises ImportError
    with pytest.raises(ExportError, match=r"needs onnxscript .*pip install 'iirp\[export\]'"):
        export_checkpoint(tiny.ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
