"""The OpenVINO bf16 accuracy gate of ``iirp-export --verify-pair [--verify-labels]``: its record in the manifest,
its criteria, and how ``--precision auto`` reads it.

bf16 numerics need a CPU with native bf16; here the gate's plumbing is checked with the capability detection
forced either way (and, for a passing record, with bf16 standing in as f32: plumbing, not numerics). The bf16
numerics themselves are tested in tests/runtime/test_openvino.py (skipped without native bf16).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from export_support import Tiny
from typer.testing import CliRunner

pytest.importorskip("openvino")

import iirp.export  # noqa: E402
from iirp.cli import export_app  # noqa: E402
from iirp.export.openvino_gate import DICE_TOLERANCE, FLOW_P999_VOXELS, flow_difference, gate_failures  # noqa: E402
from iirp.manifest import Manifest  # noqa: E402
from iirp.runtime.engines import openvino as ovmod  # noqa: E402
from iirp.runtime.solvers import make_solver  # noqa: E402

PREFIX = "iirp-export: error: "


@pytest.fixture(autouse=True)
def _setup(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The fast torchscript exporter, and a private cache folder."""
    monkeypatch.setattr(iirp.export, "export_checkpoint",
                        functools.partial(iirp.export.export_checkpoint, exporter="torchscript"))
    monkeypatch.setenv("IIRP_CACHE_DIR", str(tmp_path / "cache"))


def _export(tiny: Tiny, out, *extra: object):  # type: ignore[no-untyped-def]
    args = [tiny.ckpt, "-o", out, "--verify-pair", tiny.fixed, tiny.moving, *extra]
    return CliRunner().invoke(export_app, [str(a) for a in args])


def test_gate_not_run_without_native_bf16(tiny: Tiny, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(ovmod, "cpu_has_native_bf16", lambda: False)
    seg = tiny.root / "seg.nii.gz"
    result = _export(tiny, tmp_path / "engines", "--verify-labels", seg, seg)
    assert result.exit_code == 0, (result.output, result.exception)
    gate = Manifest.load(tmp_path / "engines").openvino["bf16_gate"]  # type: ignore[index]
    assert gate["status"] == "not_run" and "has no native bf16" in gate["reason"]
    assert gate["criteria"] == {"same_iterations": True, "dice_tolerance": DICE_TOLERANCE,
                                "flow_p99_9_voxels": FLOW_P999_VOXELS, "rule": "official"}
    assert "OpenVINO bf16 gate: not_run (the export machine's CPU" in result.stdout
    monkeypatch.setattr(ovmod, "cpu_has_native_bf16", lambda: True)  # run on a bf16 machine: auto stays fp32
    solver = make_solver("openvino", engines=tmp_path / "engines")
    assert solver.precision == "fp32" and "gate was not run" in solver.precision_note  # type: ignore[attr-defined]


def test_gate_record_and_auto_with_bf16_standing_in(tiny: Tiny, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Detection forced on and bf16 compiled as f32: the gate runs both loops, records a pass, and auto then
    runs 'bf16' (plumbing only: the numbers are fp32's)."""
    monkeypatch.setattr(ovmod, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setitem(ovmod._HINTS, "bf16", "f32")
    seg = tiny.root / "seg.nii.gz"
    result = _export(tiny, tmp_path / "engines", "--verify-labels", seg, seg)
    assert result.exit_code == 0, (result.output, result.exception)
    gate = Manifest.load(tmp_path / "engines").openvino["bf16_gate"]  # type: ignore[index]
    assert gate["status"] == "passed" and gate["reason"] == "" and gate["same_iterations"]
    assert gate["iterations"]["fp32"] == gate["iterations"]["bf16"] and len(gate["iterations"]["fp32"]) == 4
    diff = gate["flow_difference_voxels"]
    assert diff["p99"] == diff["p99_9"] == diff["max"] == 0.0 and diff["voxels"] > 0
    assert 0.0 < gate["dice"]["fp32"] <= 1.0 and gate["dice"]["difference"] == 0.0
    assert "OpenVINO bf16 gate: passed" in result.stdout
    solver = make_solver("openvino", engines=tmp_path / "engines")
    assert solver.precision == "bf16" and "gate passed" in solver.precision_note  # type: ignore[attr-defined]


def test_gate_without_labels_has_no_dice(tiny: Tiny, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(ovmod, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setitem(ovmod._HINTS, "bf16", "f32")
    assert _export(tiny, tmp_path / "engines").exit_code == 0
    gate = Manifest.load(tmp_path / "engines").openvino["bf16_gate"]  # type: ignore[index]
    assert gate["status"] == "passed" and gate["dice"] is None and gate["labels"] is None


def test_gate_criteria() -> None:
    same = {"fp32": [1, 2, 2, 1], "bf16": [1, 2, 2, 1]}
    small = {"p99": 0.1, "p99_9": 0.3}
    assert gate_failures(same, small, {"fp32": 0.62, "bf16": 0.6215}) == []
    failures = gate_failures({"fp32": [1, 2, 2, 1], "bf16": [1, 2, 3, 1]}, {"p99": 0.2, "p99_9": 0.7},
                             {"fp32": 0.62, "bf16": 0.615})
    assert failures == ["iterations differ: fp32 [1, 2, 2, 1], bf16 [1, 2, 3, 1]",
                        "p99.9 |flow difference| 0.700 > 0.5 voxel", "Dice differs by 0.0050 > 0.003"]
    assert gate_failures(same, {"p99": float("nan"), "p99_9": float("nan")}, None)  # NaN never passes


def test_flow_difference_is_the_vector_norm_in_the_mask() -> None:
    a = np.zeros((3, 4, 4, 4), dtype=np.float32)
    b = a.copy()
    b[0], b[1] = 3.0, 4.0  # |difference| = 5 everywhere
    b[:, 0] = 100.0  # outside the mask
    mask = np.zeros((4, 4, 4), dtype=bool)
    mask[1:] = True
    d = flow_difference(a, b, mask)
    assert d["p99"] == d["p99_9"] == d["max"] == d["mean"] == pytest.approx(5.0) and d["voxels"] == 48


def test_verify_labels_need_a_pair(tiny: Tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    seg = tiny.root / "seg.nii.gz"
    result = CliRunner().invoke(export_app, [str(a) for a in (tiny.ckpt, "-o", tmp_path / "e", "--verify-labels",
                                                              seg, seg)])
    assert result.exit_code == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines == [PREFIX + "export_checkpoint() 'verify_labels' (--verify-labels) needs --verify-pair"]
    assert not (tmp_path / "e").exists()
