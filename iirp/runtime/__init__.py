"""Engines, the IterStop pipeline, image geometry and I/O (no torch needed)."""

from __future__ import annotations

from iirp.runtime.geometry import MODEL_ORIENTATION, ModelGrid
from iirp.runtime.register import PreparedPair, RegistrationOptions, prepare_pair, register_files
from iirp.runtime.solvers import SOLVERS, FlowSolver, TorchSolver, make_solver

__all__ = [
    "MODEL_ORIENTATION", "ModelGrid", "PreparedPair", "RegistrationOptions", "prepare_pair",
    "register_files", "SOLVERS", "FlowSolver", "TorchSolver", "make_solver",
]
