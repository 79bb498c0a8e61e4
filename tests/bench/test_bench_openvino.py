"""iirp-bench latency with the openvino engine: rows per precision, the built-in pair when no --pair is given,
the backend of each stage in the report, and option errors before anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support import tiny_export

pytest.importorskip("torch")
pytest.importorskip("openvino")
from typer.testing import CliRunner  # noqa: E402

from iirp.cli import bench_app  # noqa: E402
from iirp.manifest import STAGES  # noqa: E402
from iirp.runtime.engines import openvino as ovmod  # noqa: E402

PREFIX = "iirp-bench: error: "


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    return tiny_export(tmp_path_factory.mktemp("bench_ov"))


def test_latency_openvino_rows_without_a_pair(exported, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("IIRP_CACHE_DIR", str(tmp_path / "cache"))
    _, engines = exported
    out = tmp_path / "lat"
    result = CliRunner().invoke(bench_app, ["latency", "--engines", str(engines), "--repeats", "1", "--warmup", "0",
                                            "--threads", "1", "-o", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    payload = json.loads((out / "latency.json").read_text())
    names = [e["engine"] for e in payload["engines"]]
    expected = ["reference", "ort-fp32", "openvino-fp32"] + ["openvino-bf16"] * ovmod.cpu_has_native_bf16()
    assert names == expected
    assert payload["config"]["pair"].startswith("synthetic: the built-in demo pair") and payload["config"]["threads"] == 1
    rows = {e["engine"]: e for e in payload["engines"]}
    assert rows["openvino-fp32"]["precision"] == "fp32" and rows["openvino-fp32"]["iterations_match_reference"]
    assert set(rows["openvino-fp32"]["stage_backends"]) == set(STAGES)
    assert rows["ort-fp32"]["stage_backends"] == {s: "ort-fp32" for s in STAGES}
    assert rows["reference"]["stage_backends"] == {s: "torch-fp32" for s in STAGES}
    assert rows["openvino-fp32"]["load_ms"] > 0
    md = (out / "latency.md").read_text()
    assert "Backend of each stage:" in md and "* openvino-fp32 stages: " in md
    assert "openvino-fp32: median" in result.output


def test_builtin_pair_on_the_demo_grid() -> None:
    from iirp.bench.run import _builtin_pair
    from iirp.demo.run import DEMO_SHAPE

    moving, fixed, name = _builtin_pair(DEMO_SHAPE)
    assert name.startswith("built-in demo pair") and moving.shape == fixed.shape == DEMO_SHAPE
    assert moving.dtype == np.float32 and 0.0 <= float(fixed.min()) and float(fixed.max()) <= 1.0


@pytest.mark.parametrize(("extra", "needle"), [
    (["--repeats", "0"], "'repeats' (--repeats) must be an integer >= 1, got 0"),
    (["--warmup", "-1"], "'warmup' (--warmup) must be an integer >= 0, got -1"),
    (["--threads", "0"], "'threads' (--threads) must be an integer >= 1, got 0"),
])
def test_counts_are_checked_before_anything_loads(tmp_path: Path, extra: list[str], needle: str) -> None:
    out = tmp_path / "lat"
    result = CliRunner().invoke(bench_app, ["latency", "--engines", str(tmp_path / "missing"), "-o", str(out), *extra])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and needle in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize(("engine", "needle"), [
    ("openvino-fp16", "must be one of"), ("onnx", "must be one of"),
    ("openvino-bf16", "--precision bf16 needs a CPU that computes bf16 natively"),
])
def test_bad_engine_rows(exported, tmp_path: Path, monkeypatch, engine: str, needle: str) -> None:
    monkeypatch.setattr(ovmod, "cpu_has_native_bf16", lambda: False)
    out = tmp_path / "lat"
    result = CliRunner().invoke(bench_app, ["latency", "--engines", str(exported[1]), "--engine", engine,
                                            "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], lines
    assert not out.exists()
