"""gzip compression of a file on several cores, into one ordinary gzip member (what pigz writes).

The input is cut into fixed-size chunks; each is deflated on its own thread (zlib releases the
GIL) as a raw deflate stream ended by a sync flush (an empty stored block, so the streams join
at byte boundaries), the last one by the final block. Header, concatenated streams and trailer
(CRC-32 and size of the whole input) form a single-member gzip file that every reader (zlib's
``gzread`` in ITK and ANTs, Python's ``gzip``, nibabel) decompresses to the input bytes. The
output depends only on the input, the level and the strategy, never on the number of threads.

Strategies (:data:`FLOAT_STRATEGY`, :data:`LABEL_STRATEGY`): deflate's string matching finds
little in float volumes (a displacement field shrinks by ~8% at any level) but costs most of
the time; run-length matching (``Z_RLE``) keeps that ratio at less than half the time. Label
maps, long runs of few values, compress best with the default strategy.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

__all__ = ["gzip_file", "CHUNK_BYTES", "FLOAT_STRATEGY", "LABEL_STRATEGY"]

#: Bytes per independently deflated chunk (fixed, so the output does not depend on the thread count).
CHUNK_BYTES = 8 << 20
#: ``(level, strategy)`` for float volumes and for label maps.
FLOAT_STRATEGY = (1, zlib.Z_RLE)
LABEL_STRATEGY = (1, zlib.Z_DEFAULT_STRATEGY)

_OS_UNKNOWN = 255


def _header(level: int) -> bytes:
    """gzip member header: deflate, no name, mtime 0 (reproducible), XFL as zlib sets it."""
    xfl = 2 if level == 9 else 4 if level == 1 else 0
    return b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + bytes([xfl, _OS_UNKNOWN])


def _deflate(data: bytes, level: int, strategy: int, last: bool) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 9, strategy)
    return compressor.compress(data) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def gzip_file(src: str, dst: str, *, level: int = 1, strategy: int = zlib.Z_DEFAULT_STRATEGY,
              threads: Optional[int] = None) -> int:
    """Compress file ``src`` into the gzip file ``dst`` (created or truncated).

    Args:
        level: zlib level 1..9.
        strategy: a zlib strategy constant (``zlib.Z_RLE``, ``zlib.Z_DEFAULT_STRATEGY``...).
        threads: compressing threads (default: the usable cores); only the speed depends on it.

    Returns:
        The size of ``dst`` in bytes.

    Raises:
        OSError: reading or writing failed (every write is checked by Python's I/O).
        ValueError: a level outside 1..9.
    """
    if not 1 <= level <= 9:
        raise ValueError(f"gzip_file() 'level' must be 1..9, got {level}")
    size = os.stat(src).st_size
    n_chunks = max(1, -(-size // CHUNK_BYTES))
    if threads is None:
        from iirp.runtime.engines.options import usable_cores

        threads = usable_cores()
    threads = max(1, min(threads, n_chunks))

    with open(src, "rb") as fin, open(dst, "wb") as fout:
        def job(index: int) -> tuple[bytes, bytes]:
            data = os.pread(fin.fileno(), CHUNK_BYTES, index * CHUNK_BYTES)
            return data, _deflate(data, level, strategy, index == n_chunks - 1)

        fout.write(_header(level))
        crc = 0
        read = 0
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="iirp-gzip") as pool:
            # at most 2 * threads chunks in flight: bounded memory, output in order
            pending = deque(pool.submit(job, i) for i in range(min(n_chunks, 2 * threads)))
            submitted = len(pending)
            while pending:
                data, deflated = pending.popleft().result()
                if submitted < n_chunks:
                    pending.append(pool.submit(job, submitted))
                    submitted += 1
                crc = zlib.crc32(data, crc)
                read += len(data)
                fout.write(deflated)
        if read != size:
            raise OSError(f"{src} changed size while it was compressed ({size} -> {read} bytes)")
        fout.write(struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))
        fout.flush()
        return fout.tell()
