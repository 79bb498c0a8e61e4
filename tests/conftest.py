"""Shared fixtures: the real data folder and capability checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: ``../shared/data`` beside the repository (override with IIRP_SHARED_DATA).
SHARED_DATA = Path(os.environ.get("IIRP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder; tests that need it skip with a reason where it is absent."""
    if not (SHARED_DATA / "mindboggle" / "mind.pt").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (set IIRP_SHARED_DATA)")
    return SHARED_DATA
