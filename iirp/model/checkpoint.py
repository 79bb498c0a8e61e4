"""Loading RP-Net checkpoints (SPEC section 2), strictly and safely.

Accepted: the released format ``{"config": {...}, "model_state": state_dict}``
and a bare state dict (``*.grid`` buffers ignored, a DataParallel ``module.``
prefix removed). Always ``torch.load(weights_only=True)``: a checkpoint is
untrusted input.

Checkpoints written by ``iirp-train`` also carry the model grid they were trained
on under a top-level key ``"iirp"`` (``{"spacing": [sx, sy, sz], "orientation":
"RAS", "intensity": "minmax"}``): outside ``"config"``, because the authors'
loader passes ``config`` to the model's constructor as keyword arguments. The
released checkpoint records nothing: its grid is 1 mm, RAS, minmax.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from iirp.errors import CheckpointError, IirpError
from iirp.manifest import sha256_file
from iirp.model.rpnet import RPNet
from iirp.shapes import check_fits_in_memory, check_model_shape
from iirp.typing import PathLike

__all__ = ["CheckpointInfo", "RECORD_KEY", "load_checkpoint", "load_state_dict", "sha256_file", "DEFAULT_MODEL_SIZE"]

#: Model grid of the released Mindboggle checkpoint, used when a bare state dict has no config.
DEFAULT_MODEL_SIZE = (160, 192, 160)
_RESBLOCK_KEY = re.compile(r"^decoder1\.Conv(\d+)\.main\.weight$")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about the model.

    Attributes:
        path: the file it came from.
        sha256: hex digest of the file.
        format: ``"released"`` or ``"state_dict"``.
        size: model grid ``(X, Y, Z)`` in voxels (NIfTI i, j, k order).
        n_resblocks: ResBlocks per flow estimator.
        first_channel: channels of the first encoder block.
        n_parameters: number of weights.
        keys: the parameter names in the file's order (``module.`` stripped, ``*.grid`` dropped).
        spacing: model grid spacing (mm, x y z) the checkpoint records, or None.
        orientation: model grid orientation (a ``DICOMOrient`` code) it records, or None.
        intensity: the intensity rule it was trained with, or None.
    """

    path: str
    sha256: str
    format: str
    size: tuple[int, int, int]
    n_resblocks: int
    first_channel: int
    n_parameters: int
    keys: tuple[str, ...] = ()
    spacing: Optional[tuple[float, float, float]] = None
    orientation: Optional[str] = None
    intensity: Optional[str] = None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


_BLOCKED_GLOBAL = re.compile(r"(?:unsupported global:?\s*(?:GLOBAL\s+)?|unsupported GLOBAL\s+)([\w.]+)", re.IGNORECASE)


def _load_reason(err: Exception) -> str:
    """The informative part of a torch.load failure (not its advice to load unsafely).

    A pickle that names a global outside torch's weights-only allowlist (a class, or a function
    such as ``posix.system`` that would run on loading) is reported by that global's name.
    """
    text = _ANSI.sub("", str(err))
    match = _BLOCKED_GLOBAL.search(text)
    if match:
        return f"it needs the Python global {match.group(1)}, which is refused (a checkpoint may hold only tensors)"
    if "Unsupported operand" in text or "zip" in text.lower() or "load key" in text.lower():
        return "not a torch checkpoint (corrupt or another format)"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)
    return first


def _read(path: Path) -> object:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise CheckpointError(
            f"checkpoint {path} cannot be read as a weights-only torch file: {_load_reason(err)}"
        ) from err


#: The model-grid record a checkpoint may carry (see the module docstring).
RECORD_KEY = "iirp"
_ORIENTATION = re.compile(r"^(?=.*[RL])(?=.*[AP])(?=.*[SI])[RLAPSI]{3}$")  # a DICOMOrient code


def _record(raw: object, path: Path) -> dict[str, Any]:
    """The checkpoint's model-grid record, checked; empty when there is none.

    Raises:
        CheckpointError: a record with a malformed spacing, orientation or intensity rule.
    """
    record = raw.get(RECORD_KEY) if isinstance(raw, dict) and "model_state" in raw else None
    if record is None:
        return {}
    if not isinstance(record, dict):
        raise CheckpointError(f"checkpoint {path}: {RECORD_KEY!r} is not a dict")
    out: dict[str, Any] = {}
    spacing = record.get("spacing")
    if spacing is not None:
        if not (isinstance(spacing, (list, tuple)) and len(spacing) == 3 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < float(v) < float("inf")
                for v in spacing)):
            raise CheckpointError(f"checkpoint {path}: model grid spacing must be 3 positive numbers, got {spacing!r}")
        out["spacing"] = tuple(float(v) for v in spacing)
    orientation = record.get("orientation")
    if orientation is not None:
        if not (isinstance(orientation, str) and _ORIENTATION.match(orientation)):
            raise CheckpointError(f"checkpoint {path}: orientation must be a code like 'RAS', got {orientation!r}")
        out["orientation"] = orientation
    intensity = record.get("intensity")
    if intensity is not None:
        from iirp.runtime.intensity import parse_intensity

        try:
            out["intensity"] = parse_intensity(str(intensity)).spec
        except IirpError as err:
            raise CheckpointError(f"checkpoint {path}: recorded intensity rule: {err}") from err
    return out


def _split(raw: object, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    if isinstance(raw, dict) and "model_state" in raw:
        state, config, fmt = raw["model_state"], raw.get("config") or {}, "released"
    elif isinstance(raw, dict):
        state, config, fmt = raw, {}, "state_dict"
    else:
        raise CheckpointError(f"checkpoint {path} holds a {type(raw).__name__}, not a state dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path}: 'model_state' is not a dict of tensors")
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path}: 'config' is not a dict")
    cleaned = {}
    for key, value in state.items():
        if key.endswith(".grid"):
            continue
        cleaned[key[len("module."):] if key.startswith("module.") else key] = value
    return cleaned, config, fmt


def _first(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict(
    state: dict[str, torch.Tensor],
    *,
    size: tuple[int, int, int] = DEFAULT_MODEL_SIZE,
    first_channel: int = 8,
    in_channel: int = 1,
    source: str = "state dict",
) -> RPNet:
    """Build an :class:`RPNet` matching ``state`` (ResBlock count inferred) and load it strictly.

    Raises:
        CheckpointError: keys missing or unexpected, or shapes differ; the message names
            the first offending keys.
    """
    indices = sorted({int(m.group(1)) for k in state if (m := _RESBLOCK_KEY.match(k))})
    if indices != list(range(1, len(indices) + 1)):
        gaps = sorted(set(range(1, max(indices, default=1) + 1)) - set(indices))
        raise CheckpointError(
            f"{source} does not match RP-Net: decoder1 layers Conv1..Conv{max(indices, default=1)} are not all "
            f"present (missing Conv{gaps[0] if gaps else 1})"
        )
    n_resblocks = max(0, len(indices) - 1)
    first = state.get("encoder.block1.main.weight")
    expected_first = (first_channel, in_channel, 3, 3, 3)
    if first is not None and tuple(first.shape) != expected_first:  # before building: the config sizes the net
        raise CheckpointError(
            f"{source} does not match RP-Net: shape mismatch encoder.block1.main.weight {tuple(first.shape)} != "
            f"{expected_first} (first_channel {first_channel})"
        )
    net = RPNet(n_resblocks=n_resblocks, first_channel=first_channel, in_channel=in_channel, size=size)
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_first(unexpected)}")
        raise CheckpointError(
            f"{source} does not match RP-Net ({n_resblocks} ResBlocks inferred): " + "; ".join(parts)
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise CheckpointError(f"{source} does not match RP-Net: shape mismatch {_first(wrong)}")
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v.float()).all())]
    if bad:
        raise CheckpointError(f"{source} has NaN/Inf weights in {_first(bad)}")
    net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return net.eval()


def load_checkpoint(path: PathLike, size: tuple[int, int, int] | None = None) -> tuple[RPNet, CheckpointInfo]:
    """Load a released or bare-state-dict checkpoint onto the CPU, in eval mode.

    Args:
        path: checkpoint file.
        size: model grid ``(X, Y, Z)``; defaults to the checkpoint's ``config.size``, else
            :data:`DEFAULT_MODEL_SIZE`.

    Raises:
        CheckpointError: not found, unreadable, not weights-only, or not RP-Net.
    """
    path = Path(os.fspath(path))
    raw = _read(path)
    state, config, fmt = _split(raw, path)
    record = _record(raw, path)
    try:
        grid = tuple(int(s) for s in (size or config.get("size") or DEFAULT_MODEL_SIZE))
        first_channel = int(config.get("first_channel", 8))
        in_channel = int(config.get("in_channel", 1))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: malformed 'config' {config!r}") from err
    check_model_shape(grid, f"checkpoint {path}: model size", CheckpointError)
    check_fits_in_memory(grid, f"checkpoint {path}")
    if in_channel != 1:
        raise CheckpointError(f"checkpoint {path}: in_channel must be 1, got {in_channel}")
    net = load_state_dict(
        state, size=grid, first_channel=first_channel, in_channel=in_channel,  # type: ignore[arg-type]
        source=f"checkpoint {path}",
    )
    info = CheckpointInfo(
        path=str(path),
        sha256=sha256_file(path),
        format=fmt,
        size=grid,  # type: ignore[arg-type]
        n_resblocks=net.n_resblocks,
        first_channel=first_channel,
        n_parameters=sum(p.numel() for p in net.parameters()),
        keys=tuple(state),
        spacing=record.get("spacing"),
        orientation=record.get("orientation"),
        intensity=record.get("intensity"),
    )
    return net, info
