"""``iirp.deflate.gzip_file``: one ordinary gzip member from chunks deflated on several threads."""

from __future__ import annotations

import gzip
import subprocess
import zlib
from pathlib import Path
from shutil import which

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iirp import deflate
from iirp.deflate import CHUNK_BYTES, gzip_file


@pytest.fixture()
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Chunks of 4 KiB, so that small inputs span many of them."""
    monkeypatch.setattr(deflate, "CHUNK_BYTES", 4096)
    return 4096


def _members(raw: bytes) -> int:
    """How many gzip members ``raw`` holds (zlib's decompressobj stops at the end of each)."""
    count = 0
    while raw:
        d = zlib.decompressobj(wbits=31)
        d.decompress(raw)
        assert d.eof
        raw = d.unused_data
        count += 1
    return count


def _float_bytes(n: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n // 4 + 1).astype(np.float32).tobytes() + b"\x00" * 7)[:n]


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096, 10 * 4096 + 17])
@pytest.mark.parametrize("strategy", [zlib.Z_RLE, zlib.Z_DEFAULT_STRATEGY, zlib.Z_HUFFMAN_ONLY])
def test_round_trip_one_member(tmp_path: Path, small_chunks: int, size: int, strategy: int) -> None:
    data = _float_bytes(size)
    (tmp_path / "in").write_bytes(data)
    written = gzip_file(str(tmp_path / "in"), str(tmp_path / "out.gz"), level=1, strategy=strategy, threads=3)
    raw = (tmp_path / "out.gz").read_bytes()
    assert written == len(raw)
    assert gzip.decompress(raw) == data  # CRC-32 and size in the trailer are checked by gzip
    assert zlib.decompress(raw, wbits=31) == data
    assert _members(raw) == 1  # readers that stop after the first member still see everything


def test_output_does_not_depend_on_threads(tmp_path: Path, small_chunks: int) -> None:
    (tmp_path / "in").write_bytes(_float_bytes(50 * 4096 + 3, seed=2))
    outs = []
    for threads in (1, 2, 5, 64):
        gzip_file(str(tmp_path / "in"), str(tmp_path / f"{threads}.gz"), threads=threads)
        outs.append((tmp_path / f"{threads}.gz").read_bytes())
    assert all(o == outs[0] for o in outs)


def test_header_is_reproducible_and_plain(tmp_path: Path) -> None:
    (tmp_path / "in").write_bytes(b"abc" * 1000)
    gzip_file(str(tmp_path / "in"), str(tmp_path / "out.gz"), level=1)
    raw = (tmp_path / "out.gz").read_bytes()
    assert raw[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff"  # deflate, no name, mtime 0, fastest


@pytest.mark.skipif(which("gzip") is None, reason="no gzip program")
def test_the_gzip_program_accepts_it(tmp_path: Path, small_chunks: int) -> None:
    data = _float_bytes(20 * 4096 + 5, seed=3)
    (tmp_path / "in").write_bytes(data)
    gzip_file(str(tmp_path / "in"), str(tmp_path / "out.gz"), strategy=zlib.Z_RLE, threads=2)
    assert subprocess.run(["gzip", "-t", str(tmp_path / "out.gz")]).returncode == 0
    assert subprocess.run(["gzip", "-dc", str(tmp_path / "out.gz")], capture_output=True).stdout == data


def test_default_chunk_is_large() -> None:
    assert CHUNK_BYTES >= 1 << 20  # small chunks would cost ratio (no dictionary across chunks)


def test_bad_level(tmp_path: Path) -> None:
    (tmp_path / "in").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"'level' must be 1..9, got 0"):
        gzip_file(str(tmp_path / "in"), str(tmp_path / "out.gz"), level=0)


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=3 * 512 + 7), level=st.integers(1, 9), threads=st.integers(1, 4))
def test_any_bytes_round_trip(tmp_path_factory: pytest.TempPathFactory, data: bytes, level: int,
                              threads: int) -> None:
    folder = tmp_path_factory.mktemp("gz")
    original = deflate.CHUNK_BYTES
    deflate.CHUNK_BYTES = 512
    try:
        (folder / "in").write_bytes(data)
        gzip_file(str(folder / "in"), str(folder / "out.gz"), level=level, threads=threads)
    finally:
        deflate.CHUNK_BYTES = original
    assert gzip.decompress((folder / "out.gz").read_bytes()) == data
