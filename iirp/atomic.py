"""All-or-nothing outputs: every file the toolkit writes appears whole, or not at all.

The one place that writes output files atomically (no torch, no SimpleITK):

* :func:`write_file`: a single file. ``writer(tmp)`` writes a hidden temporary file
  beside the target, the result is checked (it exists, is a file, and has the size
  the writer meant when it says so), then ``os.replace`` puts it in place.
* :class:`StagedFolder`: a set of files published together into an existing or new
  folder (a registration's outputs). Files are staged in a hidden partial folder
  *inside* the target, checked, then moved in one by one with the commit marker
  (``report.json``) last, while SIGINT and SIGTERM are held back; a folder without
  its marker is an incomplete run. ``overwrite`` first removes the previous set
  (marker first). Nothing else in the folder is ever deleted.
* :func:`replace_folder`: a whole folder built beside the target and swapped in
  (an export folder).

Partial folders are named ``.iirp-partial-<host>-<pid>-<random>``. A process killed
outright (SIGKILL, power loss) leaves one behind; :func:`sweep_partials` removes those
whose process is gone (same host, pid not alive) or that are older than
:data:`STALE_AFTER_S`, and every :class:`StagedFolder` sweeps its target first.

Every ``OSError`` (disk full, file too large, permission denied...) becomes one
:class:`~iirp.errors.OutputError` naming the file and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar, Union

from iirp.errors import OutputError
from iirp.typing import PathLike

__all__ = [
    "PARTIAL_PREFIX",
    "STALE_AFTER_S",
    "Writer",
    "write_file",
    "write_bytes",
    "write_text",
    "write_json",
    "os_error_text",
    "check_output_folder",
    "check_free_space",
    "partial_name",
    "sweep_partials",
    "live_partials",
    "held_signals",
    "StagedFolder",
    "replace_folder",
]

#: Prefix of every staging folder this module makes.
PARTIAL_PREFIX = ".iirp-partial-"
#: A partial folder older than this (seconds) is stale whatever its name says (other hosts, reused pids).
STALE_AFTER_S = 24 * 3600.0
_PARTIAL = re.compile(r"^\.(?:[^/]*\.)?iirp-partial-(?:(?P<host>[A-Za-z0-9.-]+)-(?P<pid>\d+)-)?[A-Za-z0-9_]+$")

#: ``writer(path)`` writes one file at ``path``; it may return the number of bytes it meant to write.
Writer = Callable[[str], Optional[int]]


def os_error_text(err: OSError) -> str:
    """A short cause for an ``OSError``: ``disk full``, ``file too large``... or its strerror."""
    names = {errno.ENOSPC: "no space left on the device (disk full)", errno.EFBIG: "file too large (size limit)",
             errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
             errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}
    return names.get(err.errno or -1, err.strerror or str(err))


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", socket.gethostname())[:40] or "host"


def partial_name(prefix: str = "") -> str:
    """Prefix for ``tempfile.mkdtemp`` of a partial folder of this process (``prefix`` goes first)."""
    return f"{prefix}{PARTIAL_PREFIX}{_host()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(path: Path, now: float) -> bool:
    match = _PARTIAL.match(path.name)
    if match is None:
        return False
    try:
        age = now - path.lstat().st_mtime
    except OSError:
        return False
    if age > STALE_AFTER_S:
        return True
    if match["pid"] is None:  # made by an older iirp (no host or pid in the name): gone after 10 minutes
        return age > 600.0
    return match["host"] == _host() and int(match["pid"]) != os.getpid() and not _pid_alive(int(match["pid"]))


def sweep_partials(folder: PathLike) -> list[Path]:
    """Remove stale partial folders (see the module docstring) directly inside ``folder``; returns them."""
    root = Path(os.fspath(folder))
    removed: list[Path] = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink() and _is_stale(entry, now):
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
    return removed


def live_partials(folder: PathLike) -> list[Path]:
    """Partial folders inside ``folder`` that are not stale: another run is writing there."""
    root = Path(os.fspath(folder))
    now = time.time()
    try:
        return [e for e in root.iterdir() if _PARTIAL.match(e.name) and e.is_dir() and not _is_stale(e, now)]
    except OSError:
        return []


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the block (main thread only), delivering them afterwards."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _check_written(path: str, expected: Optional[int], name: str) -> None:
    try:
        size = os.stat(path).st_size
    except OSError as err:
        raise OutputError(f"cannot write {name}: the writer left no file ({os_error_text(err)})") from err
    if expected is not None and size != expected:
        raise OutputError(f"cannot write {name}: short write ({size} of {expected} bytes; disk full or size limit?)")


def write_file(path: PathLike, writer: Writer) -> Path:
    """Write ``path`` atomically: ``writer(tmp)`` into a hidden file beside it, check, ``os.replace``.

    Args:
        path: the final file.
        writer: writes the whole file at the path it is given; may return the byte count it
            meant to write, which the file's size must then equal.

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        OutputError: the file cannot be written (disk full, size limit, permissions...) or is short;
            the target is then left as it was.
    """
    target = Path(os.fspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        os.close(fd)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; the result is an ordinary file
    except OSError as err:
        raise OutputError(f"cannot write {target}: {os_error_text(err)}") from err
    try:
        expected = writer(tmp)
        _check_written(tmp, expected if isinstance(expected, int) else None, str(target))
        os.replace(tmp, target)
    except OSError as err:
        raise OutputError(f"cannot write {target}: {os_error_text(err)}") from err
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    return target


def _bytes_writer(data: bytes) -> Writer:
    def _write(p: str) -> int:
        with open(p, "wb") as fh:
            fh.write(data)
        return len(data)

    return _write


def write_bytes(path: PathLike, data: bytes) -> Path:
    """:func:`write_file` of ``data``."""
    return write_file(path, _bytes_writer(data))


def write_text(path: PathLike, text: str) -> Path:
    """:func:`write_file` of ``text`` (UTF-8)."""
    return write_file(path, _bytes_writer(text.encode("utf-8")))


def write_json(path: PathLike, payload: Any) -> Path:
    """:func:`write_file` of ``payload`` as indented JSON plus a newline."""
    return write_text(path, json.dumps(payload, indent=2) + "\n")


def _probe(folder: Path, role: str, target: Path) -> None:
    """Make and remove a partial folder in ``folder``: the only proof it is writable (root passes access())."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=partial_name(), dir=folder))
    except OSError as err:
        where = "is not writable" if folder == target else f"cannot be created: {folder} is not writable"
        raise OutputError(f"{role} {target} {where} ({os_error_text(err)})") from err


#: The entries a previous run may have left: a set of file names, or a test of an entry.
Owned = Union[frozenset[str], Callable[[Path], bool]]


def check_output_folder(path: PathLike, *, overwrite: bool = False, owned: Optional[Owned] = None,
                        role: str = "output folder") -> Path:
    """Check, before any work, that ``path`` is or can become a folder that takes the outputs.

    Creates nothing that stays: a folder is proven writable by making and removing a partial
    folder in it (or in its nearest existing parent).

    Args:
        path: the output folder; the empty string counts as missing.
        overwrite: with ``owned``, accept a folder that holds a previous run's files.
        owned: the names the outputs use (or a test of an entry). When given, the folder must be
            empty (stale partial folders aside) or, with ``overwrite``, hold only files of these names
            (entries that pass the test).
        role: how messages name the folder.

    Returns:
        The absolute path.

    Raises:
        OutputError: empty path; a file in the way; not writable (read-only, /proc, /sys...);
            not empty without ``overwrite``; foreign files with it; another run writing there.
    """
    if os.fspath(path) == "":
        raise OutputError(f"missing {role}: -o/--out is empty")
    p = Path(os.fspath(path)).absolute()
    if p.exists():
        if not p.is_dir():
            raise OutputError(f"{role} {p} exists and is not a folder")
        _probe(p, role, p)
        if owned is not None:
            _check_contents(p, overwrite, owned, role)
        return p
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{role} {p} cannot be created: {parent} is not a folder")
    _probe(parent, role, p)
    return p


def _check_contents(folder: Path, overwrite: bool, owned: Owned, role: str) -> None:
    busy = live_partials(folder)
    if busy:
        raise OutputError(f"{role} {folder} is being written by another run ({busy[0].name}); wait for it or "
                          "choose another folder")
    now = time.time()
    entries = sorted(e.name for e in folder.iterdir() if not (_PARTIAL.match(e.name) and _is_stale(e, now)))
    if not entries:
        return
    shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
    if not overwrite:
        raise OutputError(f"{role} {folder} is not empty ({shown}); pass --overwrite to replace an earlier "
                          "run's outputs, or choose a new folder")
    if callable(owned):
        foreign = [n for n in entries if not owned(folder / n)]
    else:
        foreign = [n for n in entries if n not in owned or not (folder / n).is_file() or (folder / n).is_symlink()]
    if foreign:
        raise OutputError(f"{role} {folder} holds files this command does not write ({', '.join(foreign[:4])}); "
                          "--overwrite replaces only an earlier run's outputs: choose a new or empty folder")


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, innermost first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def check_free_space(folder: PathLike, need: int, role: str = "output folder") -> None:
    """Refuse, before any work, a folder whose file system has less than ``need`` bytes free.

    Raises:
        OutputError: too little space (statvfs of the folder or its nearest existing parent).
    """
    p = Path(os.fspath(folder)).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        stats = os.statvfs(p)
    except (OSError, AttributeError):
        return
    free = stats.f_bavail * stats.f_frsize
    if free < need:
        raise OutputError(f"{role} {Path(os.fspath(folder))} has {free / 2**20:.1f} MiB free; the outputs need "
                          f"about {need / 2**20:.1f} MiB while they are written")


_Staged = TypeVar("_Staged", bound="StagedFolder")


class StagedFolder:
    """Stage a set of files inside ``folder``, check them, then publish them together.

    Usage::

        with StagedFolder(out, marker="report.json") as stage:
            stage.write("warped.nii.gz", writer)
            stage.write_json("report.json", report)

    On normal exit every staged file is moved into ``folder`` (created if needed), the
    ``marker`` last, with SIGINT/SIGTERM held back. On an exception the staging folder
    is removed and ``folder`` is left exactly as it was (a folder created here is removed
    again). With ``overwrite`` the names in ``replaceable`` that exist in ``folder`` are
    removed (``marker`` first) before the new set moves in.

    Args:
        folder: the output folder.
        marker: the file published last (a folder without it is incomplete).
        overwrite: replace a previous set instead of refusing a non-empty folder.
        replaceable: the names a previous run may have left (the only ones ``overwrite`` removes).

    Raises:
        OutputError: see :meth:`__enter__` and :meth:`write`.
    """

    def __init__(self, folder: PathLike, *, marker: str, overwrite: bool = False,
                 replaceable: frozenset[str] = frozenset()) -> None:
        self.path = Path(os.fspath(folder)).absolute()
        self.marker = marker
        self.overwrite = overwrite
        self.replaceable = replaceable | {marker}
        self._created: list[Path] = []
        self._stage: Optional[Path] = None
        self._names: list[str] = []

    def __enter__(self: _Staged) -> _Staged:
        missing = _missing_folders(self.path)
        try:
            for folder in reversed(missing):
                folder.mkdir()
                self._created.append(folder)
            sweep_partials(self.path)
            self._stage = Path(tempfile.mkdtemp(prefix=partial_name(), dir=self.path))
        except OSError as err:
            self._cleanup()
            raise OutputError(f"output folder {self.path} cannot be written: {os_error_text(err)}") from err
        return self

    def _target(self, name: str) -> str:
        assert self._stage is not None, "use StagedFolder as a context manager"
        if name in self._names or "/" in name or name in ("", ".", ".."):
            raise ValueError(f"StagedFolder.write() 'name' must be a new plain file name, got {name!r}")
        self._names.append(name)
        return str(self._stage / name)

    def write(self, name: str, writer: Writer) -> Path:
        """Stage ``name`` by ``writer(staged_path)`` (see :func:`write_file`); returns its final path.

        Raises:
            OutputError: the file cannot be written or is short.
        """
        tmp = self._target(name)
        try:
            expected = writer(tmp)
            _check_written(tmp, expected if isinstance(expected, int) else None, f"{name} in {self.path}")
        except OSError as err:
            raise OutputError(f"cannot write {name} in {self.path}: {os_error_text(err)}") from err
        return self.path / name

    def write_json(self, name: str, payload: Any) -> Path:
        return self.write(name, _bytes_writer((json.dumps(payload, indent=2) + "\n").encode("utf-8")))

    def staged(self) -> dict[str, Path]:
        """The files staged so far: name -> where it lies until it is published (to checksum it)."""
        assert self._stage is not None, "use StagedFolder as a context manager"
        return {name: self._stage / name for name in self._names}

    def _cleanup(self) -> None:
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
        for folder in self._created:  # the outermost folder this call created, with what it holds
            shutil.rmtree(folder, ignore_errors=True)
            break

    def _publish(self) -> None:
        assert self._stage is not None
        names = sorted(self._names, key=lambda n: n == self.marker)  # the marker last
        with held_signals():
            if self.overwrite:  # the marker first: an interrupted replace reads as incomplete
                stale = sorted(n for n in self.replaceable if n != self.marker and n not in self._names)
                for name in (self.marker, *stale):
                    with contextlib.suppress(FileNotFoundError):
                        (self.path / name).unlink()
            for name in names:
                os.replace(self._stage / name, self.path / name)
        shutil.rmtree(self._stage, ignore_errors=True)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self._cleanup()
            return
        try:
            self._publish()
        except OSError as err:
            self._cleanup()
            raise OutputError(f"cannot publish the outputs in {self.path}: {os_error_text(err)}") from err


@contextlib.contextmanager
def replace_folder(out: PathLike) -> Iterator[Path]:
    """Build a folder beside ``out`` and swap it in on success; remove it on failure.

    Yields the staging folder. An existing ``out`` is moved aside and deleted only after the
    new folder is in place (put back if the swap fails). Folders created for ``out``'s parent
    are removed again on failure.

    Raises:
        OutputError: the staging folder cannot be made.
    """
    target = Path(os.fspath(out)).absolute()
    missing = _missing_folders(target.parent)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_partials(target.parent)
        stage = Path(tempfile.mkdtemp(prefix=partial_name(f".{target.name}"), dir=target.parent))
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    except OSError as err:
        raise OutputError(f"output folder {target} cannot be created: {os_error_text(err)}") from err
    try:
        yield stage
        with held_signals():
            old = None
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=partial_name(f".{target.name}.old"), dir=target.parent))
                os.replace(target, old / target.name)
            try:
                os.replace(stage, target)
            except OSError:
                if old is not None:  # put the previous folder back
                    os.replace(old / target.name, target)
                    old.rmdir()
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in missing:  # innermost first; only the empty ones this call created
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(err, OSError):
            raise OutputError(f"cannot write {target}: {os_error_text(err)}") from err
        raise
