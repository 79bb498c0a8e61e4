"""Shared type aliases.

Array conventions are stated once in :mod:`iirp.runtime.geometry`.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np
import numpy.typing as npt

PathLike = Union[str, "os.PathLike[str]"]
#: ``(X, Y, Z)`` float32 volume, NIfTI (i, j, k) index order.
Volume = npt.NDArray[np.float32]
#: ``(3, X, Y, Z)`` float32 displacement in voxels; component c along axis c.
Flow = npt.NDArray[np.float32]
#: Spatial extent of an array in (i, j, k) order.
Shape3 = tuple[int, int, int]
