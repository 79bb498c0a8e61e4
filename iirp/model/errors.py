"""Errors of ``iirp-train``: bad training data, options, checkpoints to start from, or resume state."""

from __future__ import annotations

from iirp.errors import IirpError

__all__ = ["TrainingError", "TrainingDataError", "ResumeError"]


class TrainingError(IirpError):
    """A training option or the checkpoint to fine-tune from is unusable."""


class TrainingDataError(TrainingError):
    """The training or validation data cannot be used (empty folder, bad CSV, too few volumes)."""


class ResumeError(TrainingError):
    """``--resume`` has nothing to resume, or the saved state does not match the options."""
