"""The output folder: ``--overwrite`` replaces a set, signals during the write leave nothing behind.

Signals need a real process: ``iirp-run`` runs in a subprocess and is sent SIGTERM (or SIGKILL) the
moment its staging folder appears, i.e. while it writes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import tiny_inputs

sitk = pytest.importorskip("SimpleITK")
torch = pytest.importorskip("torch")
from typer.testing import CliRunner  # noqa: E402

from iirp.atomic import PARTIAL_PREFIX  # noqa: E402
from iirp.cli import run_app  # noqa: E402

_CLI = "import sys; from iirp.cli import run_app; sys.argv[0] = 'iirp-run'; run_app()"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return tiny_inputs(tmp_path_factory.mktemp("outputs"))


def _args(d: dict, out: Path, *extra: str) -> list[str]:
    return [str(d["fixed"]), str(d["moving"]), "--checkpoint", str(d["ckpt"]), "-o", str(out), "--iterstop", "rpnet",
            *extra]


def _invoke(args: list[str]):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(run_app, args)


def test_overwrite_replaces_the_whole_set(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _invoke(_args(data, out, "--moving-seg", str(data["seg"]), "--qc"))
    assert first.exit_code == 0, first.stderr
    assert sorted(os.listdir(out)) == ["displacement.nii.gz", "qc.png", "report.json", "warped.nii.gz",
                                       "warped_seg.nii.gz"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    again = _invoke(_args(data, out))  # without --overwrite: refused, nothing touched
    assert again.exit_code == 2 and "is not empty" in again.stderr and "--overwrite" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    replaced = _invoke(_args(data, out, "--overwrite"))  # no labels, no QC this time
    assert replaced.exit_code == 0, replaced.stderr
    assert sorted(os.listdir(out)) == ["displacement.nii.gz", "report.json", "warped.nii.gz"]
    report = json.loads((out / "report.json").read_text())
    assert report["inputs"]["moving_seg"] is None and "qc" not in report["outputs"]


def _interactive_signals() -> None:
    """In the child before exec: SIGINT and SIGTERM as a terminal's shell leaves them. A background job of a
    non-interactive shell (how CI may start pytest) inherits SIGINT ignored, and Python keeps it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_interactive_signals)


def _wait_for_partial(proc: subprocess.Popen, out: Path, timeout: float = 300.0) -> bool:
    """True once a staging folder in ``out`` holds a file (the write has begun); False if the run ended first.

    (An empty partial folder may be the writability probe made and removed before any work.)
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            if any(p.name.startswith(PARTIAL_PREFIX) and any(p.iterdir()) for p in out.iterdir()):
                return True
        except OSError:  # the folder vanished while it was listed
            pass
        time.sleep(0.002)
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_the_write_leaves_nothing(signum: int, data: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    proc = _start(_args(data, out, "--moving-seg", str(data["seg"]), "--qc"))
    if not _wait_for_partial(proc, out):
        proc.communicate()
        pytest.skip("the run finished before the signal could be sent")
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iirp-run: ") and "nothing was written" in lines[0], stderr
    assert os.listdir(out) == []


def test_sigkill_leftovers_are_swept_by_the_next_run(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    proc = _start(_args(data, out, "--qc"))
    if not _wait_for_partial(proc, out):
        proc.communicate()
        pytest.skip("the run finished before the signal could be sent")
    proc.kill()
    proc.communicate(timeout=300)
    left = [p.name for p in out.iterdir()]
    assert any(name.startswith(PARTIAL_PREFIX) for name in left) and "report.json" not in left, left
    rerun = _invoke(_args(data, out, "--overwrite"))
    assert rerun.exit_code == 0, rerun.stderr
    assert not [p for p in out.iterdir() if p.name.startswith(PARTIAL_PREFIX)]
    assert (out / "report.json").is_file()
