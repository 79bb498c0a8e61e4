"""Shared fixtures: the real data folder and capability checks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

#: ``../shared/data`` beside the repository (override with IIRP_SHARED_DATA).
SHARED_DATA = Path(os.environ.get("IIRP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def _cache_of_this_session(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the tests' caches (exported demo, cubins, OpenVINO blobs) out of the user's ~/.cache/iirp."""
    if "IIRP_CACHE_DIR" not in os.environ:
        os.environ["IIRP_CACHE_DIR"] = str(tmp_path_factory.mktemp("iirp_cache"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder; tests that need it skip with a reason where it is absent."""
    if not (SHARED_DATA / "mindboggle" / "mind.pt").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (set IIRP_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cuda_torch() -> Any:
    """The torch module where a CUDA device and cuda.core are present; the test skips otherwise."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("cuda.core")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch
