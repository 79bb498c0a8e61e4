"""Where the toolkit keeps what it can rebuild: ``$IIRP_CACHE_DIR``, else ``~/.cache/iirp``.

Subfolders: ``demo/`` (the exported demo checkpoint), ``cubin/`` (compiled CUDA kernels),
``openvino/`` (OpenVINO's compiled-model cache). Deleting the folder only costs the time to
rebuild what was in it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root", "cache_dir"]


def cache_root() -> Path:
    """``$IIRP_CACHE_DIR`` when set (and not empty), else ``~/.cache/iirp``."""
    env = os.environ.get("IIRP_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "iirp"


def cache_dir(*parts: str) -> Path:
    """A subfolder of :func:`cache_root` (not created)."""
    return cache_root().joinpath(*parts)
