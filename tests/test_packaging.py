"""The GPU extras resolve: ``pip install --dry-run '.[gpu-cu12]'`` (and cu13) finds every package.

NVIDIA serves TensorRT's libraries only from its own index (``tensorrt-cuXX-libs`` on PyPI is a stub
that downloads several GB from pypi.nvidia.com while pip prepares its metadata). So a metadata-only
stand-in wheel of ``tensorrt-cuXX-libs`` (same name, the version ``tensorrt-cuXX`` pins) is offered
beside the registry; everything else resolves from the registry, and nothing is installed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = {"gpu-cu12": ("12", "cupy-cuda12x"), "gpu-cu13": ("13", "cupy-cuda13x")}


def _pip(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


def _newest(package: str) -> str:
    done = _pip("index", "versions", package, timeout=120)
    match = re.search(rf"{re.escape(package)} \(([^)]+)\)", done.stdout)
    if done.returncode != 0 or match is None:
        pytest.skip(f"the package registry cannot be reached here ({done.stderr.strip()[:200]})")
    return match.group(1)


def _stand_in_wheel(folder: Path, name: str, version: str) -> Path:
    """A wheel with only the metadata of ``name==version`` (no files, no dependencies)."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: iirp-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
        f"{len(text.encode())}\n" for path, text in files.items()
    ) + f"{dist}.dist-info/RECORD,,\n"
    files[f"{dist}.dist-info/RECORD"] = record
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_gpu_extra_resolves(extra: str, tmp_path: Path) -> None:
    major, cupy = EXTRAS[extra]
    trt = f"tensorrt-cu{major}"
    _stand_in_wheel(tmp_path, f"{trt}-libs", _newest(trt))
    report = tmp_path / "report.json"
    done = _pip("install", "--dry-run", "--ignore-installed", "--quiet", "--find-links", str(tmp_path),
                "--report", str(report), f"{ROOT}[{extra}]")
    assert done.returncode == 0, done.stderr[-3000:]
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}
    assert {"iirp", cupy, "cuda-core", "cuda-bindings", trt, f"{trt}-bindings", f"{trt}-libs"} <= names, names
    assert "onnxruntime-gpu" not in names  # the CPU onnxruntime stays the only one (README, "GPU install")
