"""``mypy iirp/export iirp/runtime/engines/trt.py`` passes, with the local TensorRT stub (tests/export/stubs)
standing in for tensorrt.

Opt-in (``IIRP_TYPECHECK=1``): with a cold ``.mypy_cache`` mypy analyses torch and takes
over five minutes on a small CPU (about 10 s warm), too much for CI's budget; run it after
touching iirp/export or the TensorRT backend. ``--follow-imports=silent`` keeps other packages' findings out of it
(the stub only covers the TensorRT names iirp uses).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUBS = Path(__file__).resolve().parent / "stubs"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("IIRP_TYPECHECK") != "1", reason="opt-in: IIRP_TYPECHECK=1 (minutes cold)")
def test_mypy_tensorrt_users() -> None:
    pytest.importorskip("mypy")
    env = {**os.environ, "MYPYPATH": str(STUBS)}
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "iirp/export", "iirp/runtime/engines/trt.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stdout + result.stderr
