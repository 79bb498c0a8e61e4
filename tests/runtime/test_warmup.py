"""The background kernel warm-up: it loads every kernel overload a CPU registration calls, and never fails a run."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from support import tiny_export
from typer.testing import CliRunner

from iirp.runtime import warmup

#: In a fresh process: the warm-up, then a registration; prints the kernel overloads each step loaded.
_SCRIPT = """
import json, sys, importlib
import numba.core.registry

MODULES = ["iirp.kernels.warp", "iirp.kernels.upsample", "iirp.kernels.score", "iirp.kernels._sampling",
           "iirp.kernels.resample", "iirp.kernels.jacobian"]

def overloads():
    found = {}
    for name in MODULES:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if isinstance(value, numba.core.registry.CPUDispatcher):
                found[f"{name}.{attr}"] = sorted(str(s) for s in value.signatures)
    return found

from iirp.runtime.warmup import warm_up
if sys.argv[1] == "warm":
    warm_up()
warmed = overloads()
from iirp.runtime import make_solver
from iirp.runtime.register import register_files
report = register_files(sys.argv[2], sys.argv[3], make_solver("ort", engines=sys.argv[4]), sys.argv[5],
                        moving_seg=sys.argv[6])
print(json.dumps({"warmed": warmed, "after": overloads(), "warp_method": report.get("warp_method")}))
"""


@pytest.fixture(scope="module")
def engine_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    return tiny_export(tmp_path_factory.mktemp("warmup"))


def _overloads(mode: str, engine_folder: tuple[dict, Path], out: Path) -> dict:
    data, engines = engine_folder
    args = [mode, data["fixed"], data["moving"], engines, out, data["seg"]]
    result = subprocess.run([sys.executable, "-c", _SCRIPT, *map(str, args)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_warm_up_loads_every_overload_a_registration_calls_but_the_label_warp(
        engine_folder: tuple[dict, Path], tmp_path: Path) -> None:
    record = _overloads("warm", engine_folder, tmp_path / "out")
    used = {name for name, sigs in record["after"].items() if sigs}
    new = {name: sorted(set(sigs) - set(record["warmed"][name])) for name, sigs in record["after"].items()}
    assert {name for name, sigs in new.items() if sigs} == {"iirp.kernels.resample._warp_labels_kernel"}, new
    # the registration really went through the kernels the warm-up is for (not SimpleITK's resampler)
    assert {"iirp.kernels.resample._warp_image_kernel", "iirp.kernels.jacobian._folding_kernel",
            "iirp.kernels.warp._warp_cl_tile", "iirp.kernels._sampling.sample_tile",
            "iirp.kernels.upsample._upsample_rows"} <= used


def test_without_the_warm_up_the_registration_loads_them_itself(
        engine_folder: tuple[dict, Path], tmp_path: Path) -> None:
    """The check above can fail: without the warm-up nothing is loaded before the registration."""
    record = _overloads("cold", engine_folder, tmp_path / "out")
    assert not any(record["warmed"].values())
    assert sum(bool(sigs) for sigs in record["after"].values()) >= 6


def test_a_failing_warm_up_is_only_logged(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise RuntimeError("no numba today")

    monkeypatch.setattr(warmup, "warm_up", broken)
    with caplog.at_level(logging.DEBUG, logger=warmup.__name__):
        warmup.warm_up_in_background().join(timeout=60)
    assert "kernel warm-up failed" in caplog.text and "no numba today" in caplog.text


def test_iirp_run_starts_the_warm_up_before_reading(monkeypatch: pytest.MonkeyPatch, engine_folder: tuple[dict, Path],
                                                    tmp_path: Path) -> None:
    from iirp.cli import run_app
    from iirp.runtime import register

    events: list[str] = []
    monkeypatch.setattr(warmup, "warm_up_in_background", lambda: events.append("warm-up"))
    real_read = register.read_inputs

    def read(*args: object, **kwargs: object) -> object:
        events.append("read")
        return real_read(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(register, "read_inputs", read)
    data, engines = engine_folder
    result = CliRunner().invoke(run_app, [str(data["fixed"]), str(data["moving"]), "--engines", str(engines),
                                          "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert events == ["warm-up", "read"]
