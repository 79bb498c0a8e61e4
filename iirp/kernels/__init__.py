"""Warp / compose / upsample / score kernels on host numpy arrays.

These are the CPU implementations: numba kernels (``nogil``, ``cache=True``,
fastmath off) run on ``numba.get_num_threads()`` threads over ranges of the
first spatial axis (see :mod:`iirp.kernels._parallel`); the per-voxel
arithmetic they share is stated in :mod:`iirp.kernels._sampling`. The CUDA
kernels in :mod:`iirp.kernels.cuda_ops` are ports of that arithmetic; the numba
code stays the reference with the same signature and edge handling.

Conventions (see :mod:`iirp.runtime.geometry`, SPEC section 3): arrays are
batch-free, C-contiguous float32 -- volumes ``(X, Y, Z)``, feature maps
``(C, X, Y, Z)``, flows ``(3, X, Y, Z)`` displacements in voxels of their own
grid, component c along array axis c. Sampling is trilinear with
``align_corners=True`` (voxel centres at integer indices) and zero padding.
Inputs of another real dtype or layout are converted with
``np.ascontiguousarray(x, dtype=np.float32)``; an ``out=`` buffer must already be
a C-contiguous float32 array of the result's shape, not overlapping the inputs.

* :func:`warp` -- ``src(p + u(p))``.
* :func:`compose` -- ``warp(phi, du) + du`` in one pass.
* :func:`upsample`, :func:`upsample2` -- ``s * trilinear_resize(u, s x)``.
* :func:`ncc` -- global NCC with unbiased std.
* :func:`fused_ncc_score` -- ``ncc(warp(m, upsample(u, s)), f)`` without
  materialising the full-resolution flow or warped image (the IterStop score).

Importing this package imports numba (not torch); compilation happens on the
first call of each function and is cached on disk next to the sources. Large
scratch arrays (a channels-last copy of a warped feature map, the z-resized
flow of the score) are kept per thread between calls, until :func:`release_scratch`.
"""

from __future__ import annotations

from iirp.kernels._parallel import release_work_buffers as release_scratch
from iirp.kernels.score import fused_ncc_score, ncc
from iirp.kernels.upsample import upsample, upsample2
from iirp.kernels.warp import compose, warp

__all__ = ["warp", "compose", "upsample", "upsample2", "ncc", "fused_ncc_score", "release_scratch"]
