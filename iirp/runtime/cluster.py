"""Cohorts on a Ray cluster: one long-lived actor per worker, pairs as small tasks, the summary on the driver.

Ray is imported here only, and only when a cohort runs on it (``pip install 'iirp[ray]'``).

* **Workers.** :func:`start_workers` makes ``N`` actors of :class:`PairWorker`, each with
  ``num_cpus=C`` and ``num_gpus=G``. An actor builds its solver once (:meth:`SolverSpec.build`,
  threads bounded to ``C``) and then registers pair after pair. Ray gives an actor with GPUs its
  own ``CUDA_VISIBLE_DEVICES``, so a ``cuda`` solver runs on ``cuda:0`` inside it
  (:meth:`SolverSpec.in_worker`).
* **Tasks.** A task carries the pair's file paths, the cohort folder and the options, never
  volumes; it returns the pair's summary row. The driver keeps one task per worker in flight
  (a queue on the driver, so a dying worker loses one pair at most) and records every row in the
  summary as it arrives (:class:`~iirp.runtime.cohort_state.Ledger`, rewritten atomically).
* **Shared folder.** Workers write the outputs themselves, so the cohort folder must be on a
  filesystem every worker sees at the same path. The driver writes a random token into a hidden
  partial folder in it; each worker must read that token and write beside it before it takes a
  pair. A worker that cannot is dropped with a warning; when none can, the run stops with one line.
* **Failures.** A pair's own error is a failed row (as in the local mode). A worker process that
  dies (killed, out of memory, crashed) is restarted by Ray (``max_restarts=-1``); the driver
  removes what the dead attempt left in the pair's folder (its partial folder, named after its host
  and pid, and a half-published set) and queues the pair once more, first in line. A second death
  on the same pair makes it a failed row, ``worker died twice: <cause>``. A worker that dies
  :data:`MAX_DEATHS_IN_A_ROW` times without finishing a pair is dropped; with no worker left the
  remaining pairs fail.
* **Stopping.** On Ctrl-C or SIGTERM (or any error) the driver kills the actors, waits for them to
  die, removes the partial folders and half sets of the pairs they were writing, and leaves the
  summary as it was: finished pairs ``ok`` or ``failed``, the rest ``pending`` (``--resume`` runs them).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import iirp
from iirp.atomic import os_error_text, partial_name
from iirp.errors import IirpError, OutputError, Terminated, one_line
from iirp.runtime.cohort import CohortEvent, make_root
from iirp.runtime.cohort_state import CohortPlan, Ledger, discard_attempt, failed_row
from iirp.runtime.pairs import ImagePair
from iirp.runtime.register import RegistrationOptions
from iirp.runtime.solver_spec import SolverSpec

__all__ = ["ClusterOptions", "PairWorker", "import_ray", "connect", "start_workers", "run_plan_on_ray",
           "MAX_DEATHS_IN_A_ROW"]

#: A worker that dies this many times without finishing a pair in between is dropped.
MAX_DEATHS_IN_A_ROW = 3
#: How long the driver waits for killed workers to die before it cleans their pairs' folders (s).
KILL_WAIT_S = 30.0
_TOKEN = "token"
log = logging.getLogger("iirp.cluster")


def import_ray() -> Any:
    """The ``ray`` module.

    Raises:
        IirpError: Ray is not installed.
    """
    try:
        import ray
    except ImportError as err:
        raise IirpError("--ray needs Ray, which is not installed: pip install 'iirp[ray]'") from err
    return ray


@dataclass(frozen=True)
class ClusterOptions:
    """How to run a cohort on Ray.

    Attributes:
        address: ``local`` (start a cluster on this machine, stopped at the end), ``auto`` (the cluster
            this machine belongs to) or a cluster address (``HOST:PORT``, ``ray://HOST:10001``). A process
            already connected to Ray keeps its connection whatever this says.
        workers: actors to start; None: as many as the cluster's resources hold (at most one per pair).
        gpus_per_worker: ``num_gpus`` of each actor, 0 or in (0, 1] (0.5 puts two workers on a GPU).
        cpus_per_worker: ``num_cpus`` of each actor; also bounds its solver's threads.
        verbose: show Ray's own log lines and the workers' output.
    """

    address: str = "local"
    workers: Optional[int] = None
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    verbose: bool = False

    def check(self, spec: SolverSpec) -> None:
        """The options, and how they combine with the solver's device (nothing is started).

        Raises:
            IirpError: an empty address; workers < 1; CPUs <= 0; GPUs outside 0..1; GPUs without
                ``--device cuda``; ``--device cuda`` without GPUs; ``--device cuda:N``.
        """
        if not self.address.strip():
            raise IirpError("--ray needs local, auto or a cluster address (HOST:PORT or ray://HOST:10001)")
        if self.workers is not None and self.workers < 1:
            raise IirpError(f"--workers must be >= 1, got {self.workers}")
        if not (self.cpus_per_worker > 0 and math.isfinite(self.cpus_per_worker)):
            raise IirpError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        if not 0 <= self.gpus_per_worker <= 1:
            raise IirpError(f"--gpus-per-worker must be between 0 and 1 (a worker runs one solver on one GPU; "
                            f"0.5 puts two workers on each GPU), got {self.gpus_per_worker}")
        if spec.device.startswith("cuda:"):
            raise IirpError(f"--device {spec.device} with --ray: Ray chooses each worker's GPU; use --device cuda")
        if self.gpus_per_worker > 0 and spec.device != "cuda":
            raise IirpError(f"--gpus-per-worker {self.gpus_per_worker:g} needs --device cuda (the solver would run "
                            f"on {spec.device!r} and leave the GPU idle)")
        if spec.device == "cuda" and self.gpus_per_worker == 0:
            raise IirpError("--device cuda with --ray needs --gpus-per-worker G > 0, so that Ray gives each worker "
                            "a GPU")

    @property
    def threads(self) -> int:
        """Solver threads per worker: ``floor(cpus_per_worker)``, at least 1."""
        return max(1, int(self.cpus_per_worker))


def connect(options: ClusterOptions) -> bool:
    """Connect to (or start) the cluster unless this process is connected already; True when it connected here.

    Raises:
        IirpError: Ray is missing, or the cluster cannot be reached or started.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    problem = _unreachable(options.address)
    if problem:  # ray.init would retry an unreachable address for minutes
        raise IirpError(f"cannot connect to the Ray cluster at {options.address!r}: {problem}")
    kwargs: dict[str, Any] = {"logging_level": logging.INFO if options.verbose else logging.ERROR,
                              "log_to_driver": options.verbose}
    if options.address == "local":
        kwargs["include_dashboard"] = False
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(address=options.address, **kwargs)
    except Exception as err:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError...
        what = "start a local Ray cluster" if options.address == "local" else \
            f"connect to the Ray cluster at {options.address!r}"
        raise IirpError(f"cannot {what}: {one_line(str(err), 300)}") from err
    finally:
        if callable(previous):
            # ray.init replaces SIGTERM's handler with sys.exit (a local cluster's: stop its processes, exit 1);
            # the caller's own handler (iirp-run: Terminated, exit 143) comes back, and the driver's cleanup
            # (kill the actors, remove their partial folders, then ray.shutdown) runs with the cluster alive.
            signal.signal(signal.SIGTERM, previous)
    return True


def _unreachable(address: str, timeout: float = 5.0) -> Optional[str]:
    """Why ``HOST:PORT`` (or ``ray://HOST:PORT``) takes no TCP connection, or None (also for ``local``/``auto``)."""
    host, sep, port = address.strip().split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return None  # local, auto, or something for Ray to judge
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as err:
        return f"nothing answers at {host}:{port} ({os_error_text(err) if err.strerror else err or 'timed out'})"
    return None


# --------------------------------------------------------------------------- the worker (a Ray actor)


class PairWorker:
    """A Ray actor's body: builds its solver once, then registers pairs (see the module docstring).

    Args:
        spec: how to build the solver (its device as the driver asked: ``cpu`` or ``cuda``).
        token_dir: the driver's shared-folder token folder inside the cohort folder (None: no check).
        token: what ``token_dir/token`` holds.
    """

    def __init__(self, spec: SolverSpec, token_dir: Optional[str] = None, token: str = "") -> None:
        self.spec = spec
        self.token_dir = token_dir
        self.token = token
        self.solver: Any = None

    def placement(self) -> dict[str, Any]:
        """Where this worker runs and what Ray gave it (no solver is built).

        Returns:
            ``host``, ``pid``, ``partial_prefix`` (:func:`iirp.atomic.partial_name` of this process: its
            partial folders' names start with it), ``gpu_ids`` (Ray's, as strings),
            ``cuda_visible_devices``, ``device`` (the solver's device in this worker, or None with
            ``error``), ``iirp_version``, ``iirp_path``.
        """
        import ray

        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        info: dict[str, Any] = {
            "host": socket.gethostname(), "pid": os.getpid(), "partial_prefix": partial_name(), "gpu_ids": gpu_ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": None, "error": "",
            "iirp_version": iirp.__version__, "iirp_path": os.path.dirname(iirp.__file__),
        }
        try:
            info["device"] = self.spec.in_worker(gpu_ids).device
        except IirpError as err:
            info["error"] = str(err)
        return info

    def prepare(self) -> dict[str, Any]:
        """Check the shared folder and build the solver (once); returns :meth:`placement` (``error`` set on failure).

        Never raises for a problem of this worker's own: it is returned as ``error``, one line.
        """
        info = self.placement()
        if info["error"]:
            return info
        problem = _check_token(self.token_dir, self.token) if self.token_dir is not None else None
        if problem:
            info["error"] = problem
            return info
        if self.solver is None:
            try:
                self.solver = self.spec.in_worker(info["gpu_ids"]).build()
            except IirpError as err:
                info["error"] = f"cannot build the solver: {one_line(str(err))}"
            except Exception as err:  # noqa: BLE001 - one line to the driver, whatever went wrong
                info["error"] = f"cannot build the solver: unexpected {type(err).__name__}: {one_line(str(err))}"
        return info

    def run(self, pair: ImagePair, root: str, options: RegistrationOptions, qc: bool, overwrite: bool
            ) -> dict[str, Any]:
        """Register one pair into ``root/<id>/``; returns ``{"row": summary row, "pid": this process}``."""
        from iirp.runtime.cohort import register_pair

        if self.solver is None:  # prepare() is always called first; a restarted actor is prepared again
            raise RuntimeError("PairWorker.run() before prepare()")
        outcome = register_pair(pair, self.solver, Path(root), options=options, qc=qc, overwrite=overwrite)
        return {"row": outcome.row(), "pid": os.getpid()}


def _check_token(token_dir: str, token: str) -> Optional[str]:
    """Why this worker cannot share the cohort folder with the driver, or None."""
    folder = os.path.dirname(token_dir)
    try:
        with open(os.path.join(token_dir, _TOKEN), encoding="utf-8") as fh:
            seen = fh.read().strip()
    except OSError:
        seen = None
    if seen != token:
        return (f"cannot see the cohort output folder {folder} as the driver does (the driver's token "
                f"{os.path.join(token_dir, _TOKEN)} is {'missing' if seen is None else 'different'} here): it must "
                "be on a filesystem every Ray worker shares, at the same path (NFS, Lustre...)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=partial_name(), dir=token_dir))
    except OSError as err:
        return f"cannot write into the cohort output folder {folder}: {os_error_text(err)}"
    return None


def start_workers(spec: SolverSpec, options: ClusterOptions, count: int, token_dir: Optional[str] = None,
                  token: str = "") -> list[Any]:
    """Start ``count`` :class:`PairWorker` actors (``num_cpus``/``num_gpus`` from ``options``; restarted by Ray
    when they die). The caller connects first (:func:`connect`) and kills them at the end."""
    ray = import_ray()
    worker_spec = spec.for_workers(options.threads)
    actor = ray.remote(PairWorker).options(
        num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker, max_restarts=-1, max_task_retries=0,
    )
    return [actor.remote(worker_spec, token_dir, token) for _ in range(count)]


def worker_count(resources: dict[str, float], options: ClusterOptions, pairs: int) -> tuple[int, int]:
    """``(workers to start, workers the cluster's resources hold now)``.

    Raises:
        IirpError: the cluster holds no worker of this size.
    """
    room = math.floor(resources.get("CPU", 0.0) / options.cpus_per_worker + 1e-9)
    if options.gpus_per_worker > 0:
        room = min(room, math.floor(resources.get("GPU", 0.0) / options.gpus_per_worker + 1e-9))
    if room < 1:
        raise IirpError(
            f"the Ray cluster ({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs) has no room for a "
            f"worker of {options.cpus_per_worker:g} CPUs and {options.gpus_per_worker:g} GPUs"
        )
    return max(1, min(options.workers or room, pairs)), room


# --------------------------------------------------------------------------- the driver


class _SharedToken:
    """A hidden partial folder in the cohort folder holding a random token (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.created_root = not root.exists()
        make_root(root)
        self.root = root
        self.value = secrets.token_hex(16)
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=partial_name(), dir=root))
            umask = os.umask(0o022)
            os.umask(umask)
            os.chmod(self.dir, 0o777 & ~umask)  # mkdtemp's folder is private; workers may run as another user
            (self.dir / _TOKEN).write_text(self.value + "\n", encoding="utf-8")
        except OSError as err:
            self.remove()
            raise OutputError(f"cohort output folder {root} cannot be written: {os_error_text(err)}") from err

    def remove(self, *, root_too: bool = False) -> None:
        if getattr(self, "dir", None) is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        if root_too and self.created_root:
            with contextlib.suppress(OSError):
                self.root.rmdir()  # only when empty


@dataclass(eq=False)
class _Worker:
    """The driver's view of one actor."""

    actor: Any
    index: int
    info: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    dropped: bool = False
    prepare_ref: Any = None
    run_ref: Any = None
    pair: Optional[ImagePair] = None
    deaths_in_a_row: int = 0

    def where(self) -> str:
        if not self.info:
            return f"Ray worker {self.index}"
        return f"Ray worker {self.index} on {self.info['host']} (pid {self.info['pid']})"


def _death_cause(err: BaseException) -> str:
    """A short cause for a RayActorError: Ray's first line (the actor id left out) and its lines that say why
    (``... because ...``, the worker's exit detail, memory)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    head = (lines[0] if lines else type(err).__name__).split(" is unavailable: ", 1)[-1]
    why = [line for line in lines[1:] if "because" in line or "exit detail" in line.lower() or "memory" in line.lower()]
    return one_line(" ".join([head, *why[:2]]) + f" ({type(err).__name__})", 300)


@contextlib.contextmanager
def _deferred_signals() -> Iterator[list[int]]:
    """SIGINT and SIGTERM recorded, not raised, for the block (main thread only): the cleanup finishes."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _noting_sigterm() -> Iterator[list[int]]:
    """Record SIGTERM before its (Python) handler runs, for the block (main thread only)."""
    seen: list[int] = []
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if not callable(previous):
        yield seen
        return

    def _note(signum: int, frame: Any) -> None:
        seen.append(signum)
        previous(signum, frame)  # type: ignore[misc, operator]

    signal.signal(signal.SIGTERM, _note)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Driver:
    """Runs a plan's pairs on the workers; see the module docstring."""

    tick_s = 0.2

    def __init__(self, ray: Any, plan: CohortPlan, spec: SolverSpec, options: ClusterOptions, ledger: Ledger,
                 on_event: Optional[Callable[[CohortEvent], None]]) -> None:
        self.ray = ray
        self.plan = plan
        self.spec = spec
        self.options = options
        self.ledger = ledger
        self.on_event = on_event or (lambda event: None)
        self.workers: list[_Worker] = []
        self.queue: deque[ImagePair] = deque(plan.todo)
        self.deaths: dict[str, int] = {}
        self.token: Optional[_SharedToken] = None
        self.started = False  # the summary is on disk
        self.last_problem = ""

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        count, room = worker_count(self.ray.cluster_resources(), self.options, len(self.plan.todo))
        if self.options.workers is not None and self.options.workers > room:
            self.on_event(CohortEvent("worker", detail=f"--workers {self.options.workers}: the cluster holds {room} "
                                      "now; the others start when resources free up"))
        self.token = _SharedToken(self.plan.root)
        actors = start_workers(self.spec, self.options, count, str(self.token.dir), self.token.value)
        self.workers = [_Worker(actor, i + 1) for i, actor in enumerate(actors)]
        for worker in self.workers:
            worker.prepare_ref = worker.actor.prepare.remote()

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        with _noting_sigterm() as seen:
            try:
                self._loop()
            except KeyboardInterrupt as err:
                if seen and not isinstance(err, Terminated):  # ray.wait turns every signal into KeyboardInterrupt
                    raise Terminated(seen[-1]) from None
                raise

    def _loop(self) -> None:
        self.start()
        while self.queue or any(w.run_ref is not None for w in self.workers):
            if not any(not w.dropped for w in self.workers):
                self._fail_rest(f"no Ray worker left ({self.last_problem})")
                break
            self._dispatch()
            refs = [w.prepare_ref for w in self.workers if w.prepare_ref is not None]
            refs += [w.run_ref for w in self.workers if w.run_ref is not None]
            ready, _ = self.ray.wait(refs, num_returns=1, timeout=self.tick_s)
            for ref in ready:
                worker = next(w for w in self.workers if ref in (w.prepare_ref, w.run_ref))
                if ref is worker.prepare_ref:
                    self._prepared(worker)
                else:
                    self._finished(worker)

    def _dispatch(self) -> None:
        for worker in self.workers:
            if not self.queue:
                return
            if worker.ready and not worker.dropped and worker.run_ref is None:
                pair = self.queue.popleft()
                worker.pair = pair
                # a retry replaces whatever a dead attempt may have published before it died
                replace = self.plan.replace or pair.id in self.deaths
                worker.run_ref = worker.actor.run.remote(pair, str(self.plan.root), self.plan.options, self.plan.qc,
                                                         replace)
                self.on_event(CohortEvent("started", pair, detail=worker.where()))

    def _prepared(self, worker: _Worker) -> None:
        from ray.exceptions import RayActorError

        ref, worker.prepare_ref = worker.prepare_ref, None
        try:
            info = self.ray.get(ref)
        except RayActorError as err:
            self._died(worker, _death_cause(err))
            return
        except Exception as err:  # noqa: BLE001 - RayTaskError: a bug in prepare(); drop the worker
            info = {"error": one_line(f"unexpected {type(err).__name__}: {err}", 300)}
        problem = info.get("error") or ""
        if not problem and info.get("iirp_version") != iirp.__version__:
            problem = (f"it has iirp {info.get('iirp_version')} ({info.get('iirp_path')}), the driver "
                       f"{iirp.__version__}: install the same iirp on every node")
        worker.info = {k: v for k, v in info.items() if k != "error"} or worker.info
        if problem:
            self._drop(worker, problem)
            return
        worker.ready = True
        if not self.started:
            self.ledger.write()  # the first worker is ready: from now on the summary is on disk
            self.started = True
        gpus = f", GPU {','.join(info['gpu_ids'])} as {info['device']}" if info["gpu_ids"] else ""
        self.on_event(CohortEvent("worker", detail=f"{worker.where()} ready{gpus}"))

    def _drop(self, worker: _Worker, problem: str) -> None:
        worker.dropped = True
        worker.ready = False
        self.last_problem = f"{worker.where()}: {problem}"
        with contextlib.suppress(Exception):
            self.ray.kill(worker.actor, no_restart=True)
        if not self.started and all(w.dropped for w in self.workers):
            raise IirpError(self.last_problem)  # no worker could start: nothing was written
        self.on_event(CohortEvent("worker", detail=f"{self.last_problem}; dropped"))

    def _finished(self, worker: _Worker) -> None:
        from ray.exceptions import RayActorError

        ref, worker.run_ref = worker.run_ref, None
        pair, worker.pair = worker.pair, None
        assert pair is not None
        try:
            result = self.ray.get(ref)
        except RayActorError as err:
            cause = _death_cause(err)
            discard_attempt(self.plan.root / pair.id, worker.info.get("partial_prefix", "\0"))
            self.deaths[pair.id] = self.deaths.get(pair.id, 0) + 1
            if self.deaths[pair.id] < 2:
                self.queue.appendleft(pair)
                self.on_event(CohortEvent("retrying", pair, detail=f"{worker.where()} died: {cause}"))
            else:
                self._record(pair, failed_row(pair, f"worker died twice: {cause}"))
            self._died(worker, cause)
            return
        except Exception as err:  # noqa: BLE001 - RayTaskError: run() itself failed (not the pair): a failed row
            discard_attempt(self.plan.root / pair.id, worker.info.get("partial_prefix", "\0"))
            self._record(pair, failed_row(pair, one_line(f"unexpected error in {worker.where()}: {err}", 400)))
            return
        worker.deaths_in_a_row = 0
        self._record(pair, result["row"])

    def _died(self, worker: _Worker, cause: str) -> None:
        """After a death: prepare the restarted actor again (new pid), or drop it after too many deaths."""
        worker.ready = False
        worker.deaths_in_a_row += 1
        self.last_problem = f"{worker.where()} died: {cause}"
        if worker.deaths_in_a_row >= MAX_DEATHS_IN_A_ROW:
            self._drop(worker, f"died {worker.deaths_in_a_row} times in a row, last: {cause}")
            return
        worker.prepare_ref = worker.actor.prepare.remote()

    def _record(self, pair: ImagePair, row: dict[str, str]) -> None:
        self.ledger.record(row)
        self.on_event(CohortEvent("finished", pair, row=row))

    def _fail_rest(self, reason: str) -> None:
        while self.queue:
            pair = self.queue.popleft()
            self._record(pair, failed_row(pair, reason))

    # ------------------------------------------------------------------ stop

    def close(self) -> None:
        """Kill every actor; keep what finished; remove what the unfinished pairs left (see the module docstring)."""
        busy = [w for w in self.workers if w.run_ref is not None]
        for worker in self.workers:
            with contextlib.suppress(Exception):
                self.ray.kill(worker.actor, no_restart=True)
        if busy:
            with contextlib.suppress(Exception):
                self.ray.wait([w.run_ref for w in busy], num_returns=len(busy), timeout=KILL_WAIT_S)
        for worker in busy:
            pair = worker.pair
            assert pair is not None
            try:
                result = self.ray.get(worker.run_ref, timeout=0)  # finished just before the kill: keep it
                self.ledger.record(result["row"])
                continue
            except Exception:  # noqa: BLE001 - killed: the attempt's leftovers go
                pass
            self._wait_gone(worker)
            discard_attempt(self.plan.root / pair.id, worker.info.get("partial_prefix", "\0"))
        if self.token is not None:
            self.token.remove(root_too=not self.started)

    def _wait_gone(self, worker: _Worker, timeout: float = 5.0) -> None:
        """On this host, wait until the killed worker's process has exited (its partial folder is then final)."""
        pid, host = worker.info.get("pid"), worker.info.get("host")
        if not pid or host != socket.gethostname():
            return
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return
            except PermissionError:
                return
            time.sleep(0.05)


def run_plan_on_ray(
    plan: CohortPlan,
    spec: SolverSpec,
    options: ClusterOptions = ClusterOptions(),
    *,
    on_event: Optional[Callable[[CohortEvent], None]] = None,
) -> Ledger:
    """Register ``plan.todo`` on a Ray cluster (see the module docstring); the summary is on disk once a worker
    is ready, and rewritten after every pair.

    Args:
        plan: from :func:`~iirp.runtime.cohort_state.plan_cohort`.
        spec: how each worker builds its solver (``threads`` is set from ``options``).
        options: the cluster, the workers and their resources (checked with :meth:`ClusterOptions.check` first).
        on_event: progress (:class:`~iirp.runtime.cohort.CohortEvent`).

    Returns:
        The summary's rows.

    Raises:
        IirpError: Ray is missing; the cluster cannot be reached or holds no worker; no worker could start
            (shared folder not visible, solver not built): nothing is written then.
        KeyboardInterrupt: Ctrl-C or SIGTERM (:class:`~iirp.errors.Terminated`), after the cleanup.
    """
    options.check(spec)
    ledger = plan.ledger()
    if not plan.todo:
        make_root(plan.root)
        ledger.write()
        return ledger
    ray = import_ray()
    connected_here = connect(options)
    driver = _Driver(ray, plan, spec, options, ledger, on_event)
    try:
        driver.run()
    except BaseException:
        _stop(ray, driver, connected_here)
        raise
    caught = _stop(ray, driver, connected_here)
    if caught:  # a signal that arrived during the cleanup of a finished run
        raise KeyboardInterrupt() if caught[0] == signal.SIGINT else Terminated(caught[0])
    return ledger


def _stop(ray: Any, driver: _Driver, connected_here: bool) -> list[int]:
    """:meth:`_Driver.close`, then disconnect when :func:`connect` connected; signals meanwhile are returned."""
    with _deferred_signals() as caught:
        try:
            driver.close()
        finally:
            if connected_here:
                with contextlib.suppress(Exception):
                    ray.shutdown()
    return caught
