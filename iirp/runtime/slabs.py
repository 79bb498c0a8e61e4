"""Running a convolutional stage in slabs along the first spatial axis: the same output, less memory.

A flow estimator is a chain of "same" convolutions and point-wise operations, so an output voxel
depends only on the inputs within a fixed distance of it, the stage's *halo*: for the released
RP-Net's estimator, five 3x3x3 convolutions, a halo of 5 voxels. Running the stage on a slab of
``core + 2 * halo`` voxels along X and keeping the ``core`` voxels in its middle gives exactly the
voxels the whole-volume run gives: the zero padding of each convolution only touches the slab's
outer ``halo`` voxels, which are thrown away, except at the volume's own border, where the slab's
border is the volume's and the padding is the same as in the whole run. Each slab's working
memory scales with its size, so ``n`` slabs need about ``(X / n + 2 * halo) / X`` of the whole
stage's working memory, for ``2 * halo * n / X`` more arithmetic.

Slabs are only run where :func:`stage_halo` can prove the locality from the ONNX graph (convolutions
with stride 1 and "same" padding, point-wise operations, channel concatenation); any other operation
is a :class:`SlabError`.

Arrays are ``(N, C, X, Y, Z)`` (:mod:`iirp.runtime.geometry`); slabs cut axis 2 (X).

An input may also be a :class:`WarpedInput`: the warped moving features, computed slab by slab
(:func:`iirp.kernels.warp.warp_rows`) instead of being held whole (157 MB at full size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from iirp.errors import IirpError
from iirp.typing import PathLike

__all__ = ["SLAB_AXIS", "SlabError", "SlabWindow", "WarpedInput", "affordable_slabs", "slab_windows", "stage_halo",
           "run_in_slabs"]

#: The array axis slabs cut: X of ``(N, C, X, Y, Z)``.
SLAB_AXIS = 2
#: ONNX operations that act on each voxel alone (with constants that do not vary along X).
_POINTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Identity", "Cast", "Clip",
})


class SlabError(IirpError):
    """A stage cannot be run in slabs (an operation that is not local along X), or a bad slab count."""


@dataclass(frozen=True)
class SlabWindow:
    """One slab along X: the stage runs on ``[start, stop)`` and keeps ``[keep_start, keep_stop)`` (volume indices)."""

    start: int
    stop: int
    keep_start: int
    keep_stop: int

    @property
    def keep_in_slab(self) -> slice:
        """The kept voxels as a slice of the slab's own X axis."""
        return slice(self.keep_start - self.start, self.keep_stop - self.start)


def slab_windows(extent: int, slabs: int, halo: int) -> list[SlabWindow]:
    """At most ``slabs`` windows of one length covering ``[0, extent)``, each keeping voxels at least ``halo`` from
    its cut faces (or on the volume's border).

    Every window has the length ``min(ceil(extent / slabs) + 2 * halo, extent)``, so one compiled shape serves
    them all: the windows at the two ends are moved inwards instead of shortened. The kept ranges are
    ``ceil(extent / slabs)`` long (the last may be shorter) and tile ``[0, extent)`` without overlap.

    Raises:
        SlabError: ``slabs`` < 1, or more slabs than voxels, or a negative halo.
    """
    if isinstance(slabs, bool) or not isinstance(slabs, int) or slabs < 1:
        raise SlabError(f"slab_windows() 'slabs' must be an integer >= 1, got {slabs!r}")
    if slabs > extent:
        raise SlabError(f"slab_windows() cannot cut {extent} voxels into {slabs} slabs")
    if halo < 0:
        raise SlabError(f"slab_windows() 'halo' must be >= 0, got {halo}")
    core = math.ceil(extent / slabs)
    length = min(core + 2 * halo, extent)
    windows = []
    for keep_start in range(0, extent, core):
        keep_stop = min(keep_start + core, extent)
        start = min(max(keep_start - halo, 0), extent - length)
        windows.append(SlabWindow(start, start + length, keep_start, keep_stop))
    return windows


def affordable_slabs(extent: int, halo: int, most: int) -> int:
    """The most slabs, up to ``most``, whose halos add at most half the stage's arithmetic along X
    (``2 * halo * n <= extent / 2``); at least 1 (whole). 8 at 160 voxels and a halo of 5; 1 at 32."""
    if halo <= 0:
        return max(1, min(most, extent))
    return max(1, min(most, extent // (4 * halo)))


def stage_halo(onnx_path: PathLike) -> int:
    """How far along X an output voxel of this ONNX stage sees: the sum of its convolutions' reaches.

    The sum over every convolution bounds the longest chain, so it is safe for any graph of these
    operations (exact for a chain such as RP-Net's estimator: 5 for two ResBlocks).

    Raises:
        SlabError: an operation whose output voxel depends on more than a bounded neighbourhood along X
            (pooling, resampling, reshapes, reductions...), a strided or not "same"-padded convolution, a
            concatenation along another axis than channels, or a constant that varies along X.
    """
    import onnx

    path = Path(onnx_path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    constants = {init.name: tuple(init.dims) for init in graph.initializer}
    halo = 0
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            halo += _conv_reach(node.name or node.output[0], attrs, constants.get(node.input[1]), path)
        elif node.op_type == "Concat":
            if attrs.get("axis") not in (1, -4):
                raise SlabError(f"{path.name}: Concat along axis {attrs.get('axis')} cannot run in slabs")
        elif node.op_type == "Constant":
            value = attrs.get("value")
            constants[node.output[0]] = tuple(value.dims) if value is not None else ()
        elif node.op_type in _POINTWISE:
            for name in node.input:
                dims = constants.get(name)
                if dims is not None and len(dims) >= 3 and dims[-3] != 1:
                    raise SlabError(f"{path.name}: {node.op_type} with a constant that varies along X cannot run "
                                    "in slabs")
        else:
            raise SlabError(f"{path.name}: operation {node.op_type} is not local along X; this stage cannot run "
                            "in slabs")
    return halo


def _conv_reach(name: str, attrs: dict, weight_dims: tuple | None, path: Path) -> int:
    """Voxels along X a "same", stride-1 convolution reaches on each side."""
    if weight_dims is None or len(weight_dims) != 5:
        raise SlabError(f"{path.name}: convolution {name} has no 3D constant kernel; cannot run in slabs")
    kernel = int(weight_dims[2])
    dilation = int((attrs.get("dilations") or [1, 1, 1])[0])
    strides = list(attrs.get("strides") or [1, 1, 1])
    pads = list(attrs.get("pads") or [0] * 6)
    reach = dilation * (kernel - 1) // 2
    same = attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET") and pads[0] == pads[3] == reach
    if any(s != 1 for s in strides) or not same or (kernel - 1) % 2:
        raise SlabError(f"{path.name}: convolution {name} is strided or not 'same'-padded; cannot run in slabs")
    return reach


class WarpedInput:
    """A stage input that is ``warp(src, flow)`` with a batch axis, ``(1, C, X, Y, Z)`` float32, not yet computed.

    :func:`run_in_slabs` fills each slab's buffer with :func:`iirp.kernels.warp.warp_rows` (the same values,
    bit for bit, as slicing the whole warp), so the whole warped volume never exists; any other consumer
    takes :meth:`whole`. Host arrays only.

    Args:
        src: ``(C, X, Y, Z)`` float32 volume(s) to warp.
        flow: ``(3, X, Y, Z)`` float32 displacement in voxels of src's grid.
    """

    dtype = np.dtype(np.float32)
    ndim = 5

    def __init__(self, src: np.ndarray, flow: np.ndarray) -> None:
        self.src = src
        self.flow = flow
        self.shape = (1, *src.shape)

    def fill(self, dst: np.ndarray, start: int, stop: int) -> None:
        """Write rows ``start <= x < stop`` of the warp into ``dst`` ``(1, C, stop - start, Y, Z)`` (C-contiguous)."""
        from iirp.kernels.warp import warp_rows

        warp_rows(self.src, self.flow, start, stop, out=dst[0])

    def whole(self) -> np.ndarray:
        """The whole ``(1, C, X, Y, Z)`` warp (what a stage that does not run in slabs gets)."""
        from iirp.kernels import warp

        return warp(self.src, self.flow)[None]


def run_in_slabs(
    infer: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    feeds: Mapping[str, np.ndarray | WarpedInput],
    windows: Sequence[SlabWindow],
    out_shapes: dict[str, tuple[int, ...]],
) -> dict[str, np.ndarray]:
    """Run ``infer`` slab by slab and assemble whole outputs (the numpy reference of the slab loop).

    Args:
        infer: the stage built for the slab shape: ``{name: (N, C, L, Y, Z)}`` -> ``{name: (N, C', L, Y, Z)}``,
            ``L`` the windows' length. Its outputs are read before the next call.
        feeds: whole ``(N, C, X, Y, Z)`` float32 inputs (host arrays, or :class:`WarpedInput`, warped per slab).
        windows: from :func:`slab_windows` over X.
        out_shapes: whole output shapes by name.

    Returns:
        New whole outputs ``{name: (N, C', X, Y, Z)}`` float32, each voxel from the slab that keeps it.
    """
    outputs = {name: np.empty(shape, np.float32) for name, shape in out_shapes.items()}
    length = windows[0].stop - windows[0].start
    slab_feeds = {name: np.empty((*a.shape[:SLAB_AXIS], length, *a.shape[SLAB_AXIS + 1:]), a.dtype)
                  for name, a in feeds.items()}  # one buffer per input, refilled for each slab
    for window in windows:
        for name, array in feeds.items():
            if isinstance(array, WarpedInput):
                array.fill(slab_feeds[name], window.start, window.stop)
            else:
                np.copyto(slab_feeds[name], array[:, :, window.start:window.stop])
        result = infer(slab_feeds)
        for name, out in outputs.items():
            out[:, :, window.keep_start:window.keep_stop] = result[name][:, :, window.keep_in_slab]
    return outputs
