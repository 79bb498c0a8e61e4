"""Engines, the IterStop pipeline, image geometry and I/O (no torch needed).

The SimpleITK-dependent names (geometry, ``prepare_pair``, ``register_files``...)
are imported on first access (PEP 562), so ``import iirp.runtime.pipeline`` and
``import iirp.runtime.placement`` work on a machine without SimpleITK (the GPU image).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

#: public name -> submodule that defines it (imported on first attribute access).
_LAZY = {
    "MODEL_ORIENTATION": "iirp.runtime.geometry",
    "ModelGrid": "iirp.runtime.geometry",
    "PreparedPair": "iirp.runtime.register",
    "RegistrationOptions": "iirp.runtime.register",
    "prepare_pair": "iirp.runtime.register",
    "register_files": "iirp.runtime.register",
    "register_images": "iirp.runtime.register",
    "write_registration": "iirp.runtime.register",
    "Registration": "iirp.runtime.register",
    "ENGINES": "iirp.runtime.solvers",
    "FlowSolver": "iirp.runtime.solvers",
    "ReferenceSolver": "iirp.runtime.solvers",
    "TorchSolver": "iirp.runtime.solvers",
    "make_solver": "iirp.runtime.solvers",
    "EngineSolver": "iirp.runtime.pipeline",
    "make_placement": "iirp.runtime.placement",
    "SolverSpec": "iirp.runtime.solver_spec",
}

__all__ = [
    "MODEL_ORIENTATION", "ModelGrid", "PreparedPair", "RegistrationOptions", "prepare_pair",
    "register_files", "register_images", "write_registration", "Registration",
    "ENGINES", "FlowSolver", "ReferenceSolver", "TorchSolver", "make_solver", "EngineSolver", "make_placement",
    "SolverSpec",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'iirp.runtime' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
