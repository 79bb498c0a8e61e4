"""Stage backends (``ort``, ``openvino``, ``trt``, ``torch``) behind one interface; see :mod:`.base`."""

from __future__ import annotations

from iirp.runtime.engines import openvino as _openvino  # noqa: F401  (registers "openvino")
from iirp.runtime.engines import ort as _ort  # noqa: F401  (registers "ort")
from iirp.runtime.engines import torch_backend as _torch_backend  # noqa: F401  (registers "torch")
from iirp.runtime.engines import trt as _trt  # noqa: F401  (registers "trt")
from iirp.runtime.engines.base import BACKENDS, Backend, StageSet, register_backend
from iirp.runtime.engines.options import LOW_MEMORY_SLABS, BackendOptionError, BackendOptions

__all__ = ["BACKENDS", "LOW_MEMORY_SLABS", "Backend", "BackendOptionError", "BackendOptions", "StageSet",
           "register_backend"]
