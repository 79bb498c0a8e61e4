"""``import iirp.runtime`` and ``iirp-run --engines`` must work where torch cannot be imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import tiny_export

BLOCK_TORCH = "import sys; sys.modules['torch'] = None  # every 'import torch' now raises ImportError\n"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, timeout=300)


def test_runtime_imports_without_torch() -> None:
    result = _python(
        "import iirp, iirp.iterstop, iirp.manifest, iirp.runtime, iirp.runtime.pipeline, iirp.kernels, iirp.cli\n"
        "import iirp.runtime.engines\n"
        "print('ok')\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_blocking_really_blocks_torch() -> None:
    result = _python("import torch\n")
    assert result.returncode != 0 and "import of torch halted" in result.stderr


@pytest.fixture(scope="module")
def engine_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    return tiny_export(tmp_path_factory.mktemp("torch_free"))


def test_iirp_run_with_engines_without_torch(engine_folder: tuple[dict, Path], tmp_path: Path) -> None:
    data, engines = engine_folder
    out = tmp_path / "out"
    args = [str(data["fixed"]), str(data["moving"]), "--engines", str(engines), "-o", str(out), "--json"]
    result = _python(
        "from iirp.cli import run_app\n"
        f"sys.argv = ['iirp-run'] + {args!r}\n"
        "try:\n    run_app()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "assert sys.modules['torch'] is None\n"
    )
    assert result.returncode == 0, result.stderr
    assert (out / "warped.nii.gz").is_file() and (out / "displacement.nii.gz").is_file()
    assert '"engine": "ort"' in result.stdout
