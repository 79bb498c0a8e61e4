"""All-or-nothing outputs (:mod:`iirp.atomic`, :func:`iirp.runtime.imageio.write_nifti`) under faults.

Faults are real where the machine allows: a file-size limit (``RLIMIT_FSIZE``, what ``ulimit -f`` sets)
for short writes, and a tiny tmpfs for a full disk (mounting needs root, which CI has); where mounting
is refused, the full disk is a writer that raises ``ENOSPC`` as the kernel would.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from support import stale_partial

from iirp import atomic
from iirp.atomic import StagedFolder, check_output_folder, live_partials, replace_folder, sweep_partials, write_file
from iirp.errors import OutputError

sitk = pytest.importorskip("SimpleITK")
from iirp.runtime.imageio import AtomicOutputDir, parse_nifti_header, write_nifti  # noqa: E402


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """``ulimit -f`` for this process (Python ignores SIGXFSZ, so a write past the limit fails with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.fixture()
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (a full disk after 64 KiB), or skip where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", f"iirp-{uuid.uuid4().hex[:8]}", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); "
                    "test_enospc_from_the_writer covers the same path")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _image(shape: tuple[int, int, int] = (40, 40, 40), vector: bool = False) -> "sitk.Image":
    rng = np.random.default_rng(0)
    array = rng.random((*shape, 3) if vector else shape, dtype=np.float32)
    return sitk.GetImageFromArray(array, isVector=vector)


# --------------------------------------------------------------------------- single files


def test_write_file_publishes_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old\n")
    atomic.write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert _listing(tmp_path) == ["a.txt"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # an ordinary file, not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_write_file_refuses_a_short_file(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"previous")

    def _short(path: str) -> int:
        Path(path).write_bytes(b"12345")
        return 10  # meant 10 bytes, 5 arrived

    with pytest.raises(OutputError, match=r"cannot write .*a\.bin: short write \(5 of 10 bytes"):
        write_file(target, _short)
    assert target.read_bytes() == b"previous"
    assert _listing(tmp_path) == ["a.bin"]


def test_enospc_from_the_writer(tmp_path: Path) -> None:
    def _full(path: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OutputError, match=r"cannot write .*x\.json: no space left on the device \(disk full\)"):
        write_file(tmp_path / "x.json", _full)
    assert _listing(tmp_path) == []


def test_file_size_limit_is_an_output_error(tmp_path: Path) -> None:
    with file_size_limit(1000), pytest.raises(OutputError, match=r"file too large \(size limit\)"):
        atomic.write_bytes(tmp_path / "big.bin", b"x" * 5000)
    assert _listing(tmp_path) == []


def test_full_tmpfs_is_an_output_error(tiny_disk: Path) -> None:
    with pytest.raises(OutputError, match=r"no space left on the device \(disk full\)"):
        atomic.write_bytes(tiny_disk / "big.bin", b"x" * 200_000)
    assert _listing(tiny_disk) == []


# --------------------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("vector", [False, True])
@pytest.mark.parametrize("compress", [True, False])
def test_write_nifti_round_trip(tmp_path: Path, vector: bool, compress: bool) -> None:
    image = _image(vector=vector)
    image.SetSpacing((0.8, 1.2, 2.0))
    image.SetOrigin((10.0, -5.0, 3.0))
    path = tmp_path / ("img.nii.gz" if compress else "img.nii")
    size = write_nifti(str(path), image, compress=compress)
    assert size == path.stat().st_size
    assert _listing(tmp_path) == [path.name]
    back = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert back.GetSpacing() == pytest.approx(image.GetSpacing())
    assert back.GetOrigin() == pytest.approx(image.GetOrigin())
    assert back.GetNumberOfComponentsPerPixel() == image.GetNumberOfComponentsPerPixel()


def test_write_nifti_decompresses_to_what_simpleitk_writes(tmp_path: Path) -> None:
    """Byte compatibility: the .nii.gz holds exactly the .nii SimpleITK writes (header and data)."""
    import gzip

    image = _image(vector=True)
    write_nifti(str(tmp_path / "ours.nii.gz"), image)
    sitk.WriteImage(image, str(tmp_path / "itk.nii"))
    assert gzip.decompress((tmp_path / "ours.nii.gz").read_bytes()) == (tmp_path / "itk.nii").read_bytes()


def test_write_nifti_detects_simpleitks_short_write(tmp_path: Path) -> None:
    """SimpleITK reports no error when the file-size limit cuts its write; the header check does."""
    image = _image()  # 40^3 float32: 256 000 bytes of voxels
    with file_size_limit(100_000), pytest.raises(OutputError, match=r"short write|file too large"):
        write_nifti(str(tmp_path / "cut.nii.gz"), image)
    assert _listing(tmp_path) == []


def test_write_nifti_on_a_full_disk(tiny_disk: Path) -> None:
    with pytest.raises(OutputError):
        with AtomicOutputDir(tiny_disk) as stage:
            stage.write_image("warped.nii.gz", _image())
    assert _listing(tiny_disk) == []


def test_parse_nifti_header_of_what_simpleitk_writes(tmp_path: Path) -> None:
    sitk.WriteImage(_image((5, 6, 7), vector=True), str(tmp_path / "v.nii"))
    raw = (tmp_path / "v.nii").read_bytes()
    header = parse_nifti_header(raw, "v.nii")
    assert header is not None and header.version == 1
    assert header.file_size == len(raw)
    assert header.count == 5 * 6 * 7 * 3


# --------------------------------------------------------------------------- staged folders


def test_staged_folder_publishes_marker_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append(Path(b).name), real(a, b))[1])
    with StagedFolder(tmp_path / "out", marker="report.json") as stage:
        stage.write_json("report.json", {"ok": True})
        stage.write("a.bin", lambda p: Path(p).write_bytes(b"a"))
        stage.write("b.bin", lambda p: Path(p).write_bytes(b"b"))
    assert order == ["a.bin", "b.bin", "report.json"]
    assert _listing(tmp_path / "out") == ["a.bin", "b.bin", "report.json"]


def test_staged_folder_failure_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with StagedFolder(out, marker="report.json") as stage:
            stage.write("a.bin", lambda p: Path(p).write_bytes(b"a"))
            raise RuntimeError("boom")
    assert _listing(tmp_path) == []  # the folders made for it are gone too


def test_staged_folder_interrupt_leaves_existing_folder_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        with StagedFolder(out, marker="report.json") as stage:
            stage.write("a.bin", lambda p: Path(p).write_bytes(b"a"))
            raise KeyboardInterrupt
    assert _listing(out) == []


def test_overwrite_replaces_the_whole_set(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name in ("report.json", "warped.nii.gz", "affine.tfm", "qc.png"):
        (out / name).write_text("old")
    names = frozenset({"report.json", "warped.nii.gz", "affine.tfm", "qc.png"})
    with StagedFolder(out, marker="report.json", overwrite=True, replaceable=names) as stage:
        stage.write("warped.nii.gz", lambda p: Path(p).write_text("new"))
        stage.write_json("report.json", {"new": True})
    assert _listing(out) == ["report.json", "warped.nii.gz"]  # the stale affine.tfm and qc.png are gone
    assert (out / "warped.nii.gz").read_text() == "new"


def test_sweep_removes_only_stale_partials(tmp_path: Path) -> None:
    stale = stale_partial(tmp_path)
    mine = Path(tempfile.mkdtemp(prefix=atomic.partial_name(), dir=tmp_path))
    other = tmp_path / ".iirp-partial-elsewhere.example-12345-abc"  # another host: kept for a day
    other.mkdir()
    keep = tmp_path / "keep"
    keep.mkdir()
    assert sweep_partials(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name, "keep"])
    assert set(live_partials(tmp_path)) == {mine, other}


def test_check_output_folder(tmp_path: Path) -> None:
    names = frozenset({"report.json"})
    with pytest.raises(OutputError, match=r"missing output folder"):
        check_output_folder("")
    assert check_output_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert _listing(tmp_path) == []  # the probe leaves nothing
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(OutputError, match=r"is not empty \(report\.json\); pass --overwrite"):
        check_output_folder(tmp_path, owned=names)
    assert check_output_folder(tmp_path, owned=names, overwrite=True) == tmp_path
    busy = Path(tempfile.mkdtemp(prefix=atomic.partial_name(), dir=tmp_path))
    with pytest.raises(OutputError, match=r"is being written by another run"):
        check_output_folder(tmp_path, owned=names, overwrite=True)
    busy.rmdir()
    stale_partial(tmp_path)  # a killed run's leftovers do not make the folder "not empty"
    (tmp_path / "report.json").unlink()
    assert check_output_folder(tmp_path, owned=names) == tmp_path


def test_replace_folder_swaps_or_keeps(tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with replace_folder(out) as stage:
            (stage / "new.txt").write_text("new")
            raise RuntimeError("failed export")
    assert _listing(tmp_path) == ["export"] and _listing(out) == ["old.txt"]
    with replace_folder(out) as stage:
        (stage / "new.txt").write_text("new")
    assert _listing(tmp_path) == ["export"] and _listing(out) == ["new.txt"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
