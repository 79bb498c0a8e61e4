"""Load the CPU kernels' compiled code on a background thread while a registration reads its inputs.

numba loads a kernel's cached machine code on the kernel's first call, and the first load in a
process first builds numba's whole CPU target (it imports numba's implementation modules, and
scipy's BLAS where scipy is installed): 0.5-0.8 s on the development machine, paid in the middle
of the IterStop loop by the first score. :func:`warm_up_in_background` moves that work, and the
import of numba itself, to a daemon thread started before the images are read, while one core is
otherwise idle (reading and resampling run on one thread).

The thread calls each kernel the registration will call (:func:`iirp.kernels.fused_ncc_score`,
:func:`~iirp.kernels.warp` of a feature map, :func:`~iirp.kernels.compose`,
:func:`~iirp.kernels.upsample2`, :func:`iirp.kernels.resample.warp_image`,
:func:`iirp.kernels.jacobian.folding_count`) once on tiny C-contiguous float32 arrays, the argument
types of the real calls, so each loads the very overload the registration uses. The label warp is
left out: its overload depends on the label map's pixel type, and loading a type the run does
not use would compile it where no cache exists yet. Nothing is computed for the registration
here, and nothing here changes any result: numba's compiler lock serialises loading, so a kernel
the main thread reaches first is loaded there, as without the warm-up. A failure on the thread is
only logged; the main thread then meets it again where it matters.
"""

from __future__ import annotations

import logging
import threading

__all__ = ["warm_up", "warm_up_in_background"]

_log = logging.getLogger(__name__)
#: Edge of the tiny volumes: a warp of 8 channels takes the channels-last path, as feature maps do.
_EDGE = 8
#: Channels of the tiny feature map (the channels-last path starts at 8).
_CHANNELS = 8


def warm_up() -> None:
    """Call every kernel a CPU registration uses once on tiny inputs (in this thread); see the module text."""
    import numpy as np

    from iirp.kernels import compose, fused_ncc_score, upsample2, warp
    from iirp.kernels.jacobian import folding_count
    from iirp.kernels.resample import warp_image

    n = _EDGE
    volume = np.zeros((n, n, n), np.float32)
    flow = np.zeros((3, n, n, n), np.float32)
    coarse = np.zeros((3, n // 2, n // 2, n // 2), np.float32)
    features = np.zeros((_CHANNELS, n, n, n), np.float32)
    fused_ncc_score(volume, volume, coarse, 2)
    warp(features, flow)
    compose(flow, flow)
    upsample2(coarse)
    warp_image(volume, flow)
    folding_count(flow, (1.0, 1.0, 1.0))


def _run() -> None:
    try:
        warm_up()
    except Exception:  # noqa: BLE001 - only a head start: the real call raises it again where it matters
        _log.debug("kernel warm-up failed", exc_info=True)


def warm_up_in_background() -> threading.Thread:
    """Start :func:`warm_up` on a daemon thread and return the thread (joining it is never needed)."""
    thread = threading.Thread(target=_run, name="iirp-kernel-warm-up", daemon=True)
    thread.start()
    return thread
