"""What every ``iirp-*`` command shares: one-line errors, exit codes, signals and quiet libraries.

The promise (README, "Guarantees"): a command that fails prints exactly one line on stderr,
``<prog>: error: <what and which file>``, and exits with

* 0: done;
* 1: a cohort ran, but some pairs failed (each is a row of its summary);
* 2: bad input, option, artefact or environment (nothing was written), or an unexpected error
  (the line names it; ``--verbose`` prints the traceback first);
* 128 + N: stopped by signal N (130 for Ctrl-C, 143 for SIGTERM); partial outputs are removed.

This module makes that hold for all four commands:

* :func:`one_line_command` / :func:`one_line_group` are typer command classes whose ``main`` turns
  click's usage errors (a bad ``--delta abc``, an option without its value...) into that one line
  instead of typer's usage box, and any exception that escapes a command into it as well.
* :func:`guarded` runs a command body: :class:`~iirp.errors.IirpError` -> one line, exit 2;
  Ctrl-C / SIGTERM -> exit 128 + N; anything unexpected -> one line naming it, exit 2.
* :func:`quiet_libraries` routes ITK's warnings (printed by C++ straight to stderr) and Python
  warnings (torch, numba, onnx) to the ``iirp`` logger, shown only with ``--verbose``.
* SIGTERM and SIGHUP raise :class:`~iirp.errors.Terminated` in the main thread, so ``with`` blocks
  unwind and staged outputs are removed, as on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import traceback
from types import ModuleType
from typing import Any, Callable, NoReturn, Optional, Sequence, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup

from iirp.errors import IirpError, Terminated, one_line

__all__ = ["ERROR_LINE_LIMIT", "one_line_command", "one_line_group", "fail", "guarded", "quiet_libraries",
           "log", "warn"]

T = TypeVar("T")


def _exception_classes(name: str) -> tuple[type[BaseException], ...]:
    """Every class called ``name`` in click's exception modules: typer >= 0.20 vendors click (``typer._click``,
    with Exit and Abort in ``typer.exceptions``); older typer raises click's own."""
    found = []
    for module_name in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            module: ModuleType = importlib.import_module(module_name)
        except ImportError:
            continue
        cls = getattr(module, name, None)
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


_USAGE = _exception_classes("UsageError")
_ABORT = _exception_classes("Abort")
_CLICK = _exception_classes("ClickException")
_EXIT: tuple[type[BaseException], ...] = (SystemExit, *_exception_classes("Exit"))
#: The longest error line printed (longer messages are cut).
ERROR_LINE_LIMIT = 2000
log = logging.getLogger("iirp")


def fail(prog: str, err: BaseException | str, verbose: bool = False) -> NoReturn:
    """Print ``<prog>: error: <err>`` on one line (the traceback first with ``verbose``) and exit 2."""
    if verbose and isinstance(err, BaseException):
        traceback.print_exception(err, file=sys.stderr)
    typer.echo(f"{prog}: error: {one_line(str(err), ERROR_LINE_LIMIT)}", err=True)
    raise typer.Exit(2)


def warn(prog: str, text: str) -> None:
    """Print ``<prog>: warning: <text>`` on one line of stderr."""
    typer.echo(f"{prog}: warning: {one_line(text, ERROR_LINE_LIMIT)}", err=True)


def _unexpected(err: BaseException) -> str:
    if isinstance(err, MemoryError):
        return "out of memory (the job does not fit in this machine's memory)"
    if isinstance(err, OSError) and err.errno is not None:
        from iirp.atomic import os_error_text

        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{os_error_text(err)}"
    text = one_line(str(err), 600) or "(no message)"
    where = ""
    frames = traceback.extract_tb(err.__traceback__)
    if frames:
        last = frames[-1]
        where = f" in {last.name} ({last.filename.rsplit('/', 1)[-1]}:{last.lineno})"
    return f"unexpected {type(err).__name__}{where}: {text} (rerun with --verbose for the traceback)"


def guarded(prog: str, verbose: bool, call: Callable[[], T]) -> T:
    """Run ``call()``; turn every failure into one line on stderr and the exit code of the module docstring."""
    try:
        return call()
    except _EXIT:
        raise
    except IirpError as err:
        fail(prog, err, verbose)
    except Terminated as err:
        typer.echo(f"{prog}: terminated (signal {err.signum}); nothing was written", err=True)
        raise typer.Exit(128 + err.signum) from None
    except KeyboardInterrupt:
        typer.echo(f"{prog}: interrupted; nothing was written", err=True)
        raise typer.Exit(130) from None
    except Exception as err:  # noqa: BLE001 - the promise: no traceback reaches a user
        if verbose:
            traceback.print_exception(err, file=sys.stderr)
        typer.echo(f"{prog}: error: {_unexpected(err)}", err=True)
        raise typer.Exit(2) from None


# --------------------------------------------------------------------------- signals and library output


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def _install_signals() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _raise_terminated)


class _ItkToLog:
    """A SimpleITK logger (``sitk.LoggerBase``) that hands ITK's messages to the ``iirp.itk`` logger."""

    installed = False
    _logger: Any = None  # the installed logger, referenced for the life of the process

    @classmethod
    def install(cls) -> None:
        if cls.installed:
            return
        try:
            import SimpleITK as sitk
        except ImportError:
            return

        class Logger(sitk.LoggerBase):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                super().__init__()
                self.log = logging.getLogger("iirp.itk")

            def DisplayText(self, text: str) -> None:  # noqa: N802 - ITK's name
                self.log.info(text.strip())

            def DisplayErrorText(self, text: str) -> None:  # noqa: N802
                self.log.warning(text.strip())

            def DisplayWarningText(self, text: str) -> None:  # noqa: N802
                self.log.warning(text.strip())

            def DisplayGenericOutputText(self, text: str) -> None:  # noqa: N802
                self.log.info(text.strip())

            def DisplayDebugText(self, text: str) -> None:  # noqa: N802
                self.log.debug(text.strip())

        cls._logger = Logger()
        cls._logger.SetAsGlobalITKLogger()
        cls.installed = True


class _CommandHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler this module puts on the ``iirp`` and ``py.warnings`` loggers (replaced on every command)."""


def quiet_libraries(verbose: bool) -> None:
    """Route ITK's and Python's warnings to the ``iirp`` logger; print that logger only with ``verbose``.

    Without ``verbose`` the loggers get a handler that prints nothing, which keeps Python's last-resort
    handler (WARNING and above on stderr) away; records still propagate to handlers an embedding
    program configured on the root logger.
    """
    logging.captureWarnings(True)
    handler = _CommandHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    handler.setLevel(logging.DEBUG if verbose else logging.CRITICAL + 1)
    for name in ("iirp", "py.warnings"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not isinstance(h, _CommandHandler)] + [handler]
        if verbose:
            logger.setLevel(logging.DEBUG)
    _ItkToLog.install()


# --------------------------------------------------------------------------- command classes


class _OneLine:
    """``main`` of a typer command or group that keeps the one-line promise (see the module docstring)."""

    prog = "iirp"

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        verbose = "--verbose" in argv
        quiet_libraries(verbose)
        _install_signals()
        try:
            code = super().main(  # type: ignore[misc]
                argv, prog_name, complete_var, standalone_mode=False, **extra
            )
        except _USAGE as err:
            message = one_line(err.format_message(), ERROR_LINE_LIMIT)  # type: ignore[attr-defined]
            typer.echo(f"{self.prog}: error: {message} (see {self.prog} --help)", err=True)
            code = 2
        except _ABORT:
            typer.echo(f"{self.prog}: interrupted; nothing was written", err=True)
            code = 130
        except _CLICK as err:
            message = one_line(err.format_message(), ERROR_LINE_LIMIT)  # type: ignore[attr-defined]
            typer.echo(f"{self.prog}: error: {message}", err=True)
            code = 2
        except Terminated as err:
            typer.echo(f"{self.prog}: terminated (signal {err.signum}); nothing was written", err=True)
            code = 128 + err.signum
        except KeyboardInterrupt:
            typer.echo(f"{self.prog}: interrupted; nothing was written", err=True)
            code = 130
        except Exception as err:  # noqa: BLE001 - the promise: no traceback reaches a user
            if verbose:
                traceback.print_exception(err, file=sys.stderr)
            typer.echo(f"{self.prog}: error: {_unexpected(err)}", err=True)
            code = 2
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            if args is None:  # the console script itself (CliRunner and other in-process callers pass args)
                _exit_now(code)
            sys.exit(code)
        return code


def _exit_now(code: int) -> None:
    """End a finished command's process without Python's teardown (at full size, freeing the models' and
    arrays' memory and stopping the libraries' thread pools took 0.6 s after the outputs were complete).

    Everything a command writes is complete and closed before it returns; this flushes the streams and
    the log, then ``os._exit``. Not where a Ray cluster was started in this process (its own exit handler
    stops that cluster's processes), nor with ``IIRP_FULL_EXIT`` set.
    """
    if "ray" in sys.modules or os.environ.get("IIRP_FULL_EXIT"):
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def one_line_command(prog: str) -> type[TyperCommand]:
    """A typer command class for ``prog`` that keeps the one-line promise."""
    return type(f"OneLineCommand_{prog.replace('-', '_')}", (_OneLine, TyperCommand), {"prog": prog})


def one_line_group(prog: str) -> type[TyperGroup]:
    """A typer group class (a command with subcommands) for ``prog`` that keeps the one-line promise."""
    return type(f"OneLineGroup_{prog.replace('-', '_')}", (_OneLine, TyperGroup), {"prog": prog})
