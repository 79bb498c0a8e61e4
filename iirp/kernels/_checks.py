"""Argument checks shared by the public kernel functions (no numba, no torch).

Every message names the function and the argument, what was expected and
what arrived, e.g. ``warp() 'flow' must have shape (3, 5, 6, 7), got (2, 5, 6, 7)``.
"""

from __future__ import annotations

import operator
from typing import Any, Optional, Sequence

import numpy as np


def _shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def as_float32(func: str, name: str, value: Any) -> np.ndarray:
    """``value`` as a C-contiguous float32 numpy array (no copy when it already is one).

    Other real dtypes (float64, integers) are converted with
    ``np.ascontiguousarray(value, dtype=np.float32)``, which may round.

    Raises:
        TypeError: not array-like, or not real-valued (complex, bool, object, strings).
    """
    try:
        array = np.asarray(value)
    except Exception as err:  # noqa: BLE001 - any conversion failure is the caller's mistake
        raise TypeError(f"{func}() '{name}' must be a real-valued array, got {type(value).__name__}") from err
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{func}() '{name}' must be a real-valued array, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)


def check_shape(func: str, name: str, array: np.ndarray, expected: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``array.shape == expected``."""
    if tuple(array.shape) != tuple(int(s) for s in expected):
        raise ValueError(
            f"{func}() '{name}' must have shape {_shape_text(expected)}, got {_shape_text(array.shape)}"
        )


def check_ndim(func: str, name: str, array: np.ndarray, allowed: str, ndims: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``array.ndim`` is one of ``ndims``; ``allowed`` describes them."""
    if array.ndim not in ndims:
        raise ValueError(f"{func}() '{name}' must have shape {allowed}, got {_shape_text(array.shape)}")


def check_out(
    func: str, out: Optional[np.ndarray], shape: Sequence[int], inputs: dict[str, np.ndarray]
) -> np.ndarray:
    """The output buffer: ``out`` after checking it, or a new uninitialised float32 array.

    Args:
        func: public function name for messages.
        out: caller's buffer or None.
        shape: required shape.
        inputs: name -> input array; ``out`` must not overlap any of them.

    Raises:
        ValueError: ``out`` is not a C-contiguous float32 numpy array of ``shape``,
            or it overlaps an input.
    """
    if out is None:
        return np.empty(tuple(int(s) for s in shape), dtype=np.float32)
    expected = f"a C-contiguous float32 numpy array of shape {_shape_text(shape)}"
    if not isinstance(out, np.ndarray):
        raise ValueError(f"{func}() 'out' must be {expected}, got {type(out).__name__}")
    if out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable \
            or tuple(out.shape) != tuple(int(s) for s in shape):
        layout = "C-contiguous" if out.flags.c_contiguous else "non-contiguous"
        ro = "" if out.flags.writeable else " read-only"
        raise ValueError(
            f"{func}() 'out' must be {expected}, got {layout}{ro} {out.dtype} array of shape {_shape_text(out.shape)}"
        )
    for name, array in inputs.items():
        if np.may_share_memory(out, array):
            raise ValueError(f"{func}() 'out' must not overlap '{name}'")
    return out


def check_factor(func: str, factor: Any) -> int:
    """A positive integer scale factor (bool and non-integral values rejected).

    Raises:
        TypeError: not an integer.
        ValueError: smaller than 1.
    """
    if isinstance(factor, (bool, np.bool_)):
        raise TypeError(f"{func}() 'factor' must be a positive integer, got {factor!r}")
    try:
        value = operator.index(factor)
    except TypeError as err:
        raise TypeError(f"{func}() 'factor' must be a positive integer, got {factor!r}") from err
    if value < 1:
        raise ValueError(f"{func}() 'factor' must be a positive integer, got {value}")
    return int(value)
