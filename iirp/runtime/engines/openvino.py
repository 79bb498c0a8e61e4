"""OpenVINO on the CPU (engine ``openvino``): fp32 or bf16, and onnxruntime for the stages it runs faster.

Precision (``--precision``, :func:`select_precision`):

* ``fp32``: OpenVINO compiles with ``INFERENCE_PRECISION_HINT=f32``. The hint is always set
  explicitly, because OpenVINO's CPU default is bf16 on CPUs that compute it natively (AMX,
  AVX512-BF16), which would silently change the results.
* ``bf16``: ``INFERENCE_PRECISION_HINT=bf16``; only where the CPU computes bf16 natively
  (OpenVINO's ``OPTIMIZATION_CAPABILITIES`` lists ``BF16``: :func:`cpu_has_native_bf16`).
  Elsewhere OpenVINO would quietly compile f32 (or emulate bf16 slowly), so asking for it is an
  :class:`OpenVinoPrecisionError`. Every compiled stage is read back: a stage that did not
  compile in the asked precision is an error too.
* ``auto``: bf16 where the CPU has it natively *and* the engine folder's bf16 accuracy gate
  (``manifest.openvino["bf16_gate"]``, written by ``iirp-export --verify-pair``,
  :mod:`iirp.export.openvino_gate`) passed; fp32 otherwise, with one sentence saying why
  (:attr:`PrecisionChoice.note`, the report's ``precision_note``). No record means fp32: a bf16
  result is only used where it was shown to reproduce the fp32 registration.

Per-stage backend: each stage runs on OpenVINO, or on onnxruntime where that is more than 10 %
faster on this machine (:func:`choose_backend`). The choice is measured once (both backends loaded,
one warm-up and up to three interleaved timed runs each on a random input of the stage's shape,
fewer for a slow stage with a clear winner; the minima are compared), stored in
``<cache>/stage_backends.json`` keyed by the stage file's sha256, precision, threads, CPU,
library versions and the rule (:data:`CHOICE_RULE`), and reused; ``BackendOptions.stages`` forces it.
Why: OpenVINO's flow estimators ran 1.2-2.0x faster than onnxruntime here (from run to run; 2x on the Intel
machine of the issue), while its feature extractor was slower (see README, "OpenVINO engine"). Both backends were
verified against PyTorch (onnxruntime by ``iirp-export``, OpenVINO fp32 by the tests; bf16 by the
gate), so the choice is between verified backends.

Compiled models are cached by OpenVINO in ``<cache>`` (``CACHE_DIR``), where ``<cache>`` is
``BackendOptions.cache_dir`` or :func:`~iirp.runtime.engines.options.default_cache_dir`.

Inputs are shared with OpenVINO for the call (not copied). Outputs are not copied either: they
are the infer request's own output memory, and a request is only run again once nothing refers
to its earlier outputs (another request runs meanwhile), so every call still returns arrays that
no later call overwrites, as the backend contract says (:meth:`OpenVinoBackend._free_request`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from iirp.errors import IirpError
from iirp.manifest import ManifestMismatchError, estimator_stage
from iirp.runtime.engines.base import Backend, output_shapes, register_backend
from iirp.runtime.engines.options import LOW_MEMORY_SLABS, BackendOptionError, BackendOptions, usable_cores
from iirp.runtime.slabs import SLAB_AXIS, SlabWindow, affordable_slabs, run_in_slabs, slab_windows, stage_halo

__all__ = [
    "OpenVinoPrecisionError",
    "PrecisionChoice",
    "OpenVinoBackend",
    "OpenVinoStage",
    "cpu_capabilities",
    "cpu_has_native_bf16",
    "cpu_name",
    "bf16_gate_status",
    "select_precision",
    "choose_backend",
    "check_engine_folder",
    "STAGE_CHOICE_FILE",
]

#: OpenVINO's name of native bf16 support in the CPU's ``OPTIMIZATION_CAPABILITIES``.
BF16_CAPABILITY = "BF16"
#: ``--precision`` -> OpenVINO's ``INFERENCE_PRECISION_HINT`` value.
_HINTS = {"fp32": "f32", "bf16": "bf16"}
#: Where the measured per-stage backend choice is kept, inside the cache folder.
STAGE_CHOICE_FILE = "stage_backends.json"
#: Timed rounds (one run per backend) when a stage's backend is measured, after one warm-up each ...
CHOICE_RUNS = 3
#: ... stopping early when one backend is faster by this factor (a clear call) and a round takes
#: over :data:`CHOICE_SLOW_ROUND_MS` (cheap stages always get every round: one noisy sample on a
#: busy machine must not decide them).
CHOICE_CLEAR_RATIO = 1.25
CHOICE_SLOW_ROUND_MS = 1000.0
#: onnxruntime runs a stage only when its best time beats OpenVINO's by more than this factor. The
#: engine loads OpenVINO anyway, while onnxruntime costs its own import (0.25 s and 19 MB here) and
#: session, and a near tie flips with noise from one measurement to the next (the full-size feature
#: extractor and coarsest estimator did on the development machine).
CHOICE_ORT_MARGIN = 1.10
#: Part of every cached choice's key: a change of the rule above measures again.
CHOICE_RULE = "ort-margin-1.10"


class OpenVinoPrecisionError(IirpError):
    """The asked precision cannot run here (no native bf16), or OpenVINO compiled another one."""


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as err:
        raise IirpError("engine 'openvino' needs OpenVINO: pip install openvino") from err
    return openvino


def cpu_capabilities() -> list[str]:
    """OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of the CPU (e.g. ``['FP32', 'INT8', 'BIN', 'EXPORT_IMPORT']``)."""
    return [str(c) for c in _openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def cpu_has_native_bf16() -> bool:
    """True where OpenVINO computes bf16 natively on this CPU (AMX or AVX512-BF16).

    Tests monkeypatch this function to exercise both answers on any machine.
    """
    return BF16_CAPABILITY in cpu_capabilities()


def cpu_name() -> str:
    """OpenVINO's name of the CPU (``FULL_DEVICE_NAME``), for records and cache keys."""
    try:
        return str(_openvino().Core().get_property("CPU", "FULL_DEVICE_NAME"))
    except Exception:  # an informative field only
        return "unknown CPU"


def bf16_gate_status(gate: Optional[dict[str, Any]]) -> tuple[str, str]:
    """``(status, reason)`` of a manifest's bf16 gate record: ``passed``, ``failed``, ``not_run`` or ``absent``."""
    if not gate:
        return "absent", "the engine folder has no bf16 accuracy record (export with --verify-pair to make one)"
    status = str(gate.get("status", "absent"))
    if status == "passed":
        return status, "the export's bf16 accuracy gate passed"
    if status == "failed":
        return status, f"the export's bf16 accuracy gate failed ({gate.get('reason', 'no reason recorded')})"
    return "not_run", f"the export's bf16 accuracy gate was not run ({gate.get('reason', 'no reason recorded')})"


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses and, where it is not simply what was asked for, why (one sentence)."""

    precision: str
    note: Optional[str] = None


def select_precision(requested: str, *, bf16_native: bool, gate: Optional[dict[str, Any]]) -> PrecisionChoice:
    """Resolve ``--precision`` for the ``openvino`` engine (rules in the module docstring).

    Args:
        requested: ``auto``, ``fp32`` or ``bf16``.
        bf16_native: whether this CPU computes bf16 natively (:func:`cpu_has_native_bf16`).
        gate: the engine folder's bf16 gate record (``manifest.openvino["bf16_gate"]``), or None.

    Raises:
        OpenVinoPrecisionError: ``bf16`` asked for on a CPU without native bf16.
        BackendOptionError: ``requested`` is not a precision.
    """
    requested = BackendOptions(precision=requested).precision
    if requested not in ("auto", "fp32", "bf16"):
        raise OpenVinoPrecisionError(f"engine 'openvino' computes fp32 or bf16, not {requested}")
    status, reason = bf16_gate_status(gate)
    if requested == "fp32":
        return PrecisionChoice("fp32")
    if requested == "bf16":
        if not bf16_native:
            raise OpenVinoPrecisionError(
                "--precision bf16 needs a CPU that computes bf16 natively (AMX or AVX512-BF16; OpenVINO reports "
                f"{', '.join(_cpu_capabilities_safe())} here): use --precision fp32 or auto"
            )
        return PrecisionChoice("bf16", None if status == "passed" else f"bf16 as asked, although {reason}")
    if not bf16_native:
        return PrecisionChoice("fp32", "auto chose fp32: this CPU has no native bf16 (OpenVINO lists no BF16 "
                                       "optimization capability)")
    if status == "passed":
        return PrecisionChoice("bf16", "auto chose bf16: native on this CPU and the export's bf16 accuracy gate passed")
    return PrecisionChoice("fp32", f"auto chose fp32: {reason}")


def _cpu_capabilities_safe() -> list[str]:
    """:func:`cpu_capabilities`, or ``['unknown']`` where OpenVINO cannot be asked."""
    try:
        return cpu_capabilities()
    except Exception:  # only used in messages
        return ["unknown"]


def check_engine_folder(manifest: Any, device: str) -> None:
    """The ``openvino`` engine runs fp32 ONNX exports on the CPU.

    Raises:
        IirpError: another device.
        ManifestMismatchError: an fp16 export.
    """
    if device != "cpu":
        raise IirpError(f"engine 'openvino' runs on the CPU, got --device {device}")
    if manifest.precision != "fp32":
        raise ManifestMismatchError(
            f"engine 'openvino' reads fp32 exports (it picks its compute precision with --precision); this folder "
            f"is {manifest.precision}: re-export with --precision fp32"
        )


class OpenVinoBackend(Backend):
    """One ONNX stage compiled by OpenVINO for the CPU in ``options.precision`` (``fp32`` or ``bf16``).

    Not registered on its own: engine ``openvino`` (:class:`OpenVinoStage`) uses it for the stages
    it runs on OpenVINO. ``auto`` is resolved here when the backend is used directly.
    """

    backend_name = "openvino"

    @property
    def runs_on(self) -> str:
        windows = self.__dict__.get("windows")
        slabs = f" in {len(windows)} slabs" if windows else ""
        return f"openvino-{getattr(self, 'precision', self.options.precision)}{slabs}"

    def _activate(self) -> None:
        _openvino()  # one clear error where OpenVINO is missing
        check_engine_folder(self.manifest, self.device)
        precision = self.options.precision
        if precision == "auto":
            precision = select_precision("auto", bf16_native=cpu_has_native_bf16(),
                                         gate=(self.manifest.openvino or {}).get("bf16_gate")).precision
        if precision == "bf16" and not cpu_has_native_bf16():
            select_precision("bf16", bf16_native=False, gate=None)  # raises the one-line error
        self.precision = precision
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": _HINTS[precision],  # always explicit: bf16 is the default on AMX CPUs
            "PERFORMANCE_HINT": "LATENCY",  # one request at a time: all threads on it
            "NUM_STREAMS": 1,
        }
        if self.options.threads is not None:
            config["INFERENCE_NUM_THREADS"] = self.options.threads
        self.cache_dir = _cache_folder(self.options)
        if self.cache_dir is not None:
            config["CACHE_DIR"] = str(self.cache_dir)
        if self.folder is None:
            raise IirpError(f"OpenVINO stage {self.name}: no engine folder to read {self.spec.file} from")
        self.config = config
        self.windows = self._slab_windows(self.folder / self.spec.file)
        self.compile_ms = self._compile()
        self.loaded_from_cache = _property(self.compiled, "LOADED_FROM_CACHE", False) is True

    def _compile(self) -> float:
        """Compile (or load from OpenVINO's cache) the stage, read its precision and ports back; returns the ms the
        compile (or load) took."""
        ov = _openvino()
        assert self.folder is not None
        path = self.folder / self.spec.file
        t0 = time.perf_counter()
        try:
            core = ov.Core()
            if self.windows is None:
                self.compiled = core.compile_model(str(path), "CPU", self.config)
            else:  # the model reshaped to one slab (the cache keys on the reshaped model)
                model = core.read_model(str(path))
                model.reshape({t.name: self._slab_shape(t) for t in self.spec.inputs})
                self.compiled = core.compile_model(model, "CPU", self.config)
        except Exception as err:  # OpenVINO raises RuntimeError with a multi-line log
            raise IirpError(f"OpenVINO cannot compile {path}: {str(err).strip().splitlines()[0]}") from err
        compile_ms = (time.perf_counter() - t0) * 1e3
        ran = _type_name(_property(self.compiled, "INFERENCE_PRECISION_HINT", "?"))
        if ran != _HINTS[self.precision]:  # e.g. a bf16 hint on a CPU without bf16 compiles f32 silently
            raise OpenVinoPrecisionError(
                f"OpenVINO compiled stage {self.name} with inference precision {ran}, not the asked {self.precision}"
            )
        declared = {kind: [replace(t, shape=list(self._slab_shape(t))) if self.windows else t for t in tensors]
                    for kind, tensors in (("input", self.spec.inputs), ("output", self.spec.outputs))}
        _check_ports(path, "input", declared["input"], self.compiled.inputs)
        _check_ports(path, "output", declared["output"], self.compiled.outputs)
        self.output_ports = [(t.name, self.compiled.output(t.name)) for t in self.spec.outputs]
        self.requests: list[tuple[Any, list[weakref.ref]]] = []  # (infer request, leases of its last outputs)
        return compile_ms

    def _slab_windows(self, path: Path) -> Optional[list[SlabWindow]]:
        """The slabs this stage runs in (the finest estimator with ``--slabs N``, or with ``--low-memory`` as many
        as the grid affords, up to :data:`LOW_MEMORY_SLABS`), or None: whole."""
        if not self.options.slabs_asked or self.name != estimator_stage(1):
            return None
        halo, extent = stage_halo(path), self.manifest.size[0]
        slabs = self.options.slabs if self.options.slabs > 1 else affordable_slabs(extent, halo, LOW_MEMORY_SLABS)
        if slabs == 1:
            return None
        windows = slab_windows(extent, slabs, halo)
        return windows if len(windows) > 1 and windows[0].stop - windows[0].start < extent else None

    def _slab_shape(self, tensor: Any) -> tuple[int, ...]:
        """A whole tensor's shape with X cut to the slab length."""
        shape = list(tensor.resolve(dict(zip(("X", "Y", "Z"), self.manifest.size))))
        assert self.windows is not None
        shape[SLAB_AXIS] = self.windows[0].stop - self.windows[0].start
        return tuple(shape)

    def _release(self) -> None:
        self._unload()
        self.__dict__.pop("windows", None)

    def _unload(self) -> None:
        """Drop the compiled model with its requests and ports (:meth:`_compile` builds them again)."""
        for attr in ("requests", "output_ports", "compiled"):
            self.__dict__.pop(attr, None)

    def trim(self) -> None:
        """Drops the infer requests none of whose outputs is still viewed (their output tensors go with them),
        then ``CompiledModel.release_memory()`` frees the intermediate buffers; OpenVINO allocates both again
        on the next call. Output tensors that returned arrays may still view are kept.

        With ``--low-memory`` or ``--slabs N`` a stage with no request left also unloads its compiled model,
        where OpenVINO's cache will give it back (``CACHE_DIR``; 20-130 ms at full size, on its next call):
        ``release_memory`` keeps some buffers (83 MB after the level-2 estimator at full size), unloading
        keeps none.
        """
        requests = self.__dict__.get("requests")
        if requests is not None:
            requests[:] = [(request, leases) for request, leases in requests
                           if any(ref() is not None for ref in leases)]
        compiled = self.__dict__.get("compiled")
        if compiled is None:
            return
        if self.options.slabs_asked and self.cache_dir is not None and not requests:
            self._unload()
        elif hasattr(compiled, "release_memory"):  # OpenVINO >= 2024.3
            compiled.release_memory()

    @property
    def slab_count(self) -> int:
        """How many slabs this stage runs in (1: whole)."""
        windows = self.__dict__.get("windows")
        return len(windows) if windows else 1

    @property
    def takes_warped_input(self) -> bool:
        """A stage run in slabs warps its moving features slab by slab (:class:`~iirp.runtime.slabs.WarpedInput`)."""
        return self.slab_count > 1

    @property
    def loaded(self) -> bool:
        """Whether the compiled model is in memory (see :meth:`trim`)."""
        return "compiled" in self.__dict__

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.loaded:  # unloaded by trim(): back from OpenVINO's cache
            self._compile()
        if self.windows is not None:  # new whole outputs, assembled from the slabs
            extent = self.windows[-1].keep_stop
            for name, array in feeds.items():
                if array.shape[SLAB_AXIS] != extent:  # a dynamic export fed another grid than the manifest's
                    raise IirpError(f"{self.name}.infer() '{name}': --slabs was set up for the model grid's "
                                    f"X = {extent}, got X = {array.shape[SLAB_AXIS]}")
            request, _ = self._free_request()
            ports = self.output_ports

            def one_slab(slab_feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                result = request.infer(slab_feeds, share_inputs=True, share_outputs=True)
                return {name: result[port] for name, port in ports}

            return run_in_slabs(one_slab, feeds, self.windows, output_shapes(self.spec, feeds))
        request, leases = self._free_request()
        result = request.infer(feeds, share_inputs=True, share_outputs=True)
        outputs = {}
        for name, port in self.output_ports:
            lease = _Lease(result[port])
            leases.append(weakref.ref(lease))
            outputs[name] = np.asarray(lease)
        return outputs

    def _free_request(self) -> tuple[Any, list[weakref.ref]]:
        """An infer request none of whose earlier outputs is still referenced, else a new one.

        OpenVINO writes each request's outputs into the same memory on every call, and the
        outputs are returned without a copy (the feature extractor's are 420 MB at full size,
        and copying them cost as much as a third of the stage). So a request is reused only once
        every array (or view of one) it returned is gone; while any is alive, its memory is left
        alone and another request runs. The pipeline holds at most a few per stage.
        """
        for request, leases in self.requests:
            if all(ref() is None for ref in leases):
                leases.clear()
                return request, leases
        entry: tuple[Any, list[weakref.ref]] = (self.compiled.create_infer_request(), [])
        self.requests.append(entry)
        return entry


class _Lease:
    """Owner of one output array's memory as numpy sees it: every view of the array has it as ``.base``.

    Holds the OpenVINO output view (which keeps the tensor alive); a weak reference to the lease
    tells the backend when no array of that output is left, so its request may be reused.
    """

    def __init__(self, view: np.ndarray) -> None:
        self.view = view
        self.__array_interface__ = view.__array_interface__


def _property(compiled: Any, name: str, default: Any) -> Any:
    try:
        return compiled.get_property(name)
    except Exception:  # a property this OpenVINO version does not report
        return default


def _type_name(value: Any) -> str:
    """``f32`` / ``bf16`` for an OpenVINO element type (its string form otherwise)."""
    return str(value.get_type_name()) if hasattr(value, "get_type_name") else str(value)


def _cache_folder(options: BackendOptions) -> Optional[Path]:
    """The cache folder (created), or None where it cannot be created: compiling then just is not cached."""
    path = options.cache_path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path if os.access(path, os.W_OK | os.X_OK) else None


def _check_ports(path: Path, kind: str, declared: list, ports: list) -> None:
    """Names and static dims of the compiled model's ports against the manifest.

    Raises:
        ManifestMismatchError: the file does not have the interface the manifest declares.
    """
    got = {}
    for port in ports:
        for name in port.get_names():
            got[name] = port
    missing = [t.name for t in declared if t.name not in got]
    if missing or len(ports) != len(declared):
        raise ManifestMismatchError(
            f"{path}: {kind}s {sorted(n for p in ports for n in p.get_names())} differ from the manifest's "
            f"{[t.name for t in declared]}"
        )
    for spec in declared:
        shape = got[spec.name].get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape]
        if len(dims) != len(spec.shape) or any(
                isinstance(e, int) and d is not None and d != e for d, e in zip(dims, spec.shape)):
            raise ManifestMismatchError(
                f"{path}: {kind} {spec.name!r} has shape {shape}, the manifest says {spec.shape}"
            )


# --------------------------------------------------------------------------- the engine: a backend per stage


@register_backend("openvino")
class OpenVinoStage(Backend):
    """A stage of engine ``openvino``: on OpenVINO, or on onnxruntime where that was measured faster.

    :attr:`runs_on` names the backend that was chosen (``openvino-bf16``, ``ort-fp32``...) and
    :attr:`choice` how (``forced``, ``measured`` or ``cached``) with the measured times.
    """

    @property
    def runs_on(self) -> str:
        inner = self.__dict__.get("inner")
        return inner.runs_on if inner is not None else "openvino (not loaded)"

    def _activate(self) -> None:
        check_engine_folder(self.manifest, self.device)
        forced = (self.options.stages or {}).get(self.name)
        how = "forced"
        if self.options.slabs_asked and self.name == estimator_stage(1):  # only OpenVINO runs a stage in slabs
            if forced not in (None, "openvino"):
                raise BackendOptionError(f"--slabs runs {self.name} on OpenVINO; it cannot also be put on {forced}")
            forced, how = "openvino", "slabs"
        t0 = time.perf_counter()
        if forced is not None:
            self.inner = self._make(forced).__enter__()
            self.choice: dict[str, Any] = {"backend": forced, "how": how}
        else:
            self.inner, self.choice = self._chosen()
        self.choice["load_ms"] = (time.perf_counter() - t0) * 1e3

    def _make(self, backend: str) -> Backend:
        from iirp.runtime.engines.ort import OrtBackend

        cls = OpenVinoBackend if backend == "openvino" else OrtBackend
        return cls(self.name, self.manifest, self.folder, self.placement, self.options)

    def _chosen(self) -> tuple[Backend, dict[str, Any]]:
        """The cached choice for this stage on this machine, or a new measurement (then cached)."""
        key = self._choice_key()
        cache = _cache_folder(self.options)
        record = _read_choices(cache).get(key) if cache is not None else None
        if record is not None and record.get("backend") in ("openvino", "ort"):
            return self._make(record["backend"]).__enter__(), {**record, "how": "cached"}
        ms: dict[str, list[float]] = {}
        entered: dict[str, Backend] = {}
        try:
            for name in ("openvino", "ort"):
                entered[name] = self._make(name).__enter__()
            feeds = self._random_feeds()
            for backend in entered.values():
                backend.infer(feeds)  # warm-up: first-call allocations
            for _ in range(CHOICE_RUNS):
                for name, backend in entered.items():  # interleaved: load changes hit both alike
                    t0 = time.perf_counter()
                    backend.infer(feeds)
                    ms.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)
                fast, slow = sorted(min(v) for v in ms.values())
                if slow >= CHOICE_CLEAR_RATIO * fast and sum(v[-1] for v in ms.values()) > CHOICE_SLOW_ROUND_MS:
                    break
        except BaseException:
            for backend in entered.values():
                backend.__exit__(None, None, None)
            raise
        best = choose_backend({n: min(v) for n, v in ms.items()})
        for name, backend in entered.items():
            if name != best:
                backend.__exit__(None, None, None)
        entered[best].trim()  # the measuring runs' working memory
        record = {"backend": best, "min_ms": {n: round(min(v), 3) for n, v in ms.items()},
                  "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        if cache is not None:
            _write_choice(cache, key, record)
        return entered[best], {**record, "how": "measured"}

    def _random_feeds(self) -> dict[str, np.ndarray]:
        sizes = dict(zip(("X", "Y", "Z"), self.manifest.size))
        rng = np.random.default_rng(0)
        return {t.name: rng.random(t.resolve(sizes), dtype=np.float32) for t in self.spec.inputs}

    def _choice_key(self) -> str:
        ov = _openvino()
        threads = self.options.threads or f"all{usable_cores()}"
        return "|".join(str(p) for p in (
            self.name, self.spec.sha256[:16], "x".join(map(str, self.manifest.size)), self.options.precision,
            f"threads={threads}", cpu_name(), f"openvino={ov.__version__}", f"ort={_ort_version()}", CHOICE_RULE,
        ))

    def _release(self) -> None:
        inner = self.__dict__.pop("inner", None)
        if inner is not None:
            inner.__exit__(None, None, None)

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.inner._infer(feeds)

    def trim(self) -> None:
        inner = self.__dict__.get("inner")
        if inner is not None:
            inner.trim()

    @property
    def slab_count(self) -> int:
        """How many slabs this stage runs in (1: whole, or on onnxruntime)."""
        return getattr(self.__dict__.get("inner"), "slab_count", 1)

    @property
    def takes_warped_input(self) -> bool:
        return self.slab_count > 1  # only OpenVINO runs a stage in slabs

    @property
    def loaded_from_cache(self) -> Optional[bool]:
        """Whether OpenVINO loaded this stage's compiled model from its cache (None: runs on onnxruntime)."""
        return getattr(self.__dict__.get("inner"), "loaded_from_cache", None)


def choose_backend(best_ms: dict[str, float]) -> str:
    """The backend a stage runs on, from each backend's best measured time (ms): OpenVINO unless onnxruntime
    is faster by more than :data:`CHOICE_ORT_MARGIN`."""
    if "ort" in best_ms and "openvino" in best_ms:
        return "ort" if best_ms["ort"] * CHOICE_ORT_MARGIN < best_ms["openvino"] else "openvino"
    return min(best_ms, key=lambda n: best_ms[n])


def _ort_version() -> str:
    """The installed onnxruntime's version, without importing it (0.25 s): a process whose stages all run on
    OpenVINO never loads onnxruntime."""
    import importlib.metadata

    for dist in ("onnxruntime", "onnxruntime-gpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return "absent"


def _read_choices(cache: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((cache / STAGE_CHOICE_FILE).read_text())
        if isinstance(data, dict):
            return data
    return {}


def _write_choice(cache: Path, key: str, record: dict[str, Any]) -> None:
    """Add one choice to the cache file (atomic replace; a failure only means measuring again next time)."""
    with contextlib.suppress(OSError):
        data = _read_choices(cache)
        data[key] = record
        tmp = cache / f".{STAGE_CHOICE_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, cache / STAGE_CHOICE_FILE)

