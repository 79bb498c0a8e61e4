"""The five exported stages: which module each one is, and its I/O contract.

Tensors are ``(N, C, X, Y, Z)`` in NIfTI (i, j, k) order (see :mod:`iirp.runtime.geometry`);
the contract itself is stated in :mod:`iirp.manifest`:

* ``feature_extractor`` = ``net.encoder``: ``image`` ``(2, 1, X, Y, Z)`` float32 in [0, 1]
  (fixed and moving as one batch of 2, fixed first as in :class:`iirp.model.TorchLevelOps`)
  -> ``f1..f4`` ``(2, C_k, X/2^(k-1), Y/2^(k-1), Z/2^(k-1))``.
* ``flow_estimator_{L}`` = ``net.estimator(L)``: ``moving_features`` (the warped moving
  features) and ``fixed_features`` ``(1, C_L, x, y, z)`` -> ``flow`` ``(1, 3, x, y, z)``, the
  level's residual flow in voxels of the level's grid.

Static exports record ints; dynamic exports record the symbols ``"X"``, ``"X/2"``, ``"X/4"``,
``"X/8"`` (and the same for Y, Z).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from iirp.manifest import STAGES, Dim, TensorSpec, estimator_stage

if TYPE_CHECKING:  # torch only where a module or example input is built
    import torch

    from iirp.model.rpnet import RPNet

__all__ = [
    "AXES",
    "BATCH",
    "ESTIMATOR_INPUTS",
    "ESTIMATOR_OUTPUT",
    "FEATURE_EXTRACTOR",
    "FEATURE_OUTPUTS",
    "LEVELS",
    "StageIO",
    "stage_io",
    "stage_level",
    "stage_module",
    "example_inputs",
]

FEATURE_EXTRACTOR = STAGES[0]
#: fixed and moving go through the feature extractor together
BATCH = 2
FEATURE_OUTPUTS = ("f1", "f2", "f3", "f4")
ESTIMATOR_INPUTS = ("moving_features", "fixed_features")
ESTIMATOR_OUTPUT = "flow"
AXES = ("X", "Y", "Z")
LEVELS = (1, 2, 3, 4)

StageIO = tuple[list[TensorSpec], list[TensorSpec]]


def _dims(level: int, shape: Optional[tuple[int, int, int]]) -> list[Dim]:
    """Spatial dims of ``level`` (1 = full resolution): ints for a static shape, else symbols."""
    scale = 2 ** (level - 1)
    if shape is not None:
        return [s // scale for s in shape]
    return [a if scale == 1 else f"{a}/{scale}" for a in AXES]


def stage_io(feature_channels: tuple[int, ...], shape: Optional[tuple[int, int, int]]) -> dict[str, StageIO]:
    """Inputs and outputs of every stage, in :data:`iirp.manifest.STAGES` order.

    Args:
        feature_channels: channels of F^1..F^4 (``level_channels(first_channel)[0]``).
        shape: ``(X, Y, Z)`` of a static export (multiples of 8), or None for symbols.

    Returns:
        stage name -> ``(inputs, outputs)`` as :class:`~iirp.manifest.TensorSpec` (float32).
    """
    io: dict[str, StageIO] = {
        FEATURE_EXTRACTOR: (
            [TensorSpec("image", [BATCH, 1, *_dims(1, shape)])],
            [TensorSpec(name, [BATCH, feature_channels[k], *_dims(k + 1, shape)])
             for k, name in enumerate(FEATURE_OUTPUTS)],
        )
    }
    for level in LEVELS:
        dims = _dims(level, shape)
        channels = feature_channels[level - 1]
        io[estimator_stage(level)] = (
            [TensorSpec(name, [1, channels, *dims]) for name in ESTIMATOR_INPUTS],
            [TensorSpec(ESTIMATOR_OUTPUT, [1, 3, *dims])],
        )
    return io


def stage_level(stage: str) -> int:
    """Pyramid level of an estimator stage (``flow_estimator_3`` -> 3); 1 for the feature extractor."""
    return 1 if stage == FEATURE_EXTRACTOR else int(stage.rsplit("_", 1)[1])


def stage_module(net: "RPNet", stage: str) -> "torch.nn.Module":
    """The module a stage exports: ``net.encoder`` or ``net.estimator(level)``."""
    if stage == FEATURE_EXTRACTOR:
        return net.encoder
    if stage not in STAGES:
        raise ValueError(f"stage_module() 'stage' must be one of {', '.join(STAGES)}, got {stage!r}")
    return net.estimator(stage_level(stage))


def example_inputs(io: StageIO, shape: tuple[int, int, int], seed: int = 0) -> tuple["torch.Tensor", ...]:
    """Random float32 CPU tensors in [0, 1) matching a stage's inputs at spatial size ``shape`` (X, Y, Z)."""
    import torch

    sizes = dict(zip(AXES, shape))
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(spec.resolve(sizes), generator=gen) for spec in io[0])
