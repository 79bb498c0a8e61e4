"""How the CPU kernels use threads and scratch memory (internal; no numba kernels here).

The numba kernels are compiled serial and ``nogil`` (one work item: a range of
x slabs) and :func:`parallel_for` spreads the items over Python threads: the
calling thread and up to ``numba.get_num_threads() - 1`` pool threads take
items from a shared queue until none is left. Compared with ``prange`` this
compiles a kernel once instead of three times (numba re-optimizes a callee in
every library that links it), and an item a late thread has not started yet is
taken by another one (on a busy machine numba's omp workers can start
milliseconds late, and a static split waits for them). Results never depend on
the thread count or on which thread ran an item: every output voxel, and every
per-slab partial sum of the score, is computed by exactly one item.

:func:`work_buffer` keeps large scratch arrays between calls: numba-side
allocations fault their pages in one by one, and IterStop asks for the same
shapes again and again.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

import numba
import numpy as np

__all__ = ["SERIAL_WORK", "parallel_for", "work_buffer", "release_work_buffers"]

#: Calls that write fewer values than this run on the calling thread alone: handing
#: out work costs more than it saves (and on a busy machine a woken thread may start late).
SERIAL_WORK = 2**18
#: Work items per thread: enough to balance threads that start late or run slower.
ITEMS_PER_THREAD = 8

_pool: Optional[ThreadPoolExecutor] = None
_pool_pid = -1
_pool_lock = threading.Lock()
_local = threading.local()


def _executor() -> ThreadPoolExecutor:
    """The module's pool (``NUMBA_NUM_THREADS - 1`` workers), made on first use and again in a forked child."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():  # a fork copies the pool but not its threads
            _pool = ThreadPoolExecutor(max_workers=max(1, numba.config.NUMBA_NUM_THREADS - 1),  # type: ignore[attr-defined]
                                       thread_name_prefix="iirp-kernels")
            _pool_pid = os.getpid()
        return _pool


def parallel_for(body: Callable[[int, int], None], n: int, work: int) -> None:
    """Run ``body(start, stop)`` over ``[0, n)`` in contiguous items, on up to ``numba.get_num_threads()`` threads.

    Args:
        body: called once per item with its half-open range; items must write
            disjoint outputs (the numba kernels release the GIL).
        n: number of units (x slabs) to cover.
        work: values the call writes in total; below :data:`SERIAL_WORK` the whole
            range runs as one item on the calling thread.

    Exceptions from any item are re-raised in the caller after all items stopped.
    """
    threads = min(numba.get_num_threads(), n)
    if threads <= 1 or work < SERIAL_WORK:
        body(0, n)
        return
    step = -(-n // (threads * ITEMS_PER_THREAD))
    starts = iter(range(0, n, step))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                start = next(starts, None)
            if start is None:
                return
            body(start, min(n, start + step))

    futures: list[Future[None]] = [_executor().submit(worker) for _ in range(threads - 1)]
    try:
        worker()
    finally:
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


def work_buffer(name: str, size: int, dtype: type = np.float32) -> np.ndarray:
    """A 1-D scratch array of ``size`` elements, reused by later calls from this thread.

    The contents are undefined. Each name holds one array, as large as the
    largest request so far (released with the thread).
    """
    buffers = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get(name)
    if buf is None or buf.size < size or buf.dtype != dtype:
        buf = buffers[name] = np.empty(size, dtype=dtype)
    return buf[:size]


def release_work_buffers() -> None:
    """Drop this thread's scratch arrays (:func:`work_buffer`); later calls allocate again.

    The pipeline calls it after each registration (:func:`iirp.kernels.release_scratch`), so that a
    full-size channels-last copy (157 MB) does not outlive the registration that needed it.
    """
    _local.__dict__.pop("buffers", None)
