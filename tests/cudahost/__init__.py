"""Host builds of the CUDA kernels for the ``cudahost`` tests (test-only, never imported by the package).

* ``host_shim.h`` -- lets a host C++ compiler build the unmodified ``.cu``
  sources: CUDA keywords, thread/block indices, ``__syncthreads`` with real
  barrier semantics (one fiber per CUDA thread), exact fp16 conversions.
* :mod:`cudahost.build` -- compiles each source with g++ into a cached shared
  library with one ctypes launcher per kernel instantiation.
* :mod:`cudahost.device` -- runs :mod:`iirp.kernels.cuda_ops` unchanged on those
  launchers (host arrays behind ``__cuda_array_interface__``, guarded buffers).

Why under ``tests/``: this is a verification harness (serial, slow, needs a
compiler at test time), not a CPU backend; the numba kernels are the CPU
backend. Only the ``IIRP_HOST_SHIM`` guards in ``sampling.cuh`` point here.
"""
