"""The backend contract: one exported stage, run on host arrays.

A backend is a context manager: ``__enter__`` builds the expensive object (ORT
session, TensorRT context, torch module on its device) and ``__exit__`` frees
it. :meth:`Backend.infer` takes ``{input name: array}`` and returns
``{output name: array}``; the base class checks activity, names, dtypes and
shapes against the manifest's :class:`~iirp.manifest.StageSpec`, then calls the
subclass's ``_infer``. Output arrays are fresh (never reused between calls).

Every backend gets the user's :class:`~iirp.runtime.engines.options.BackendOptions`
(precision, threads, cache folder) and says what it runs on in :attr:`Backend.runs_on`
(``ort-fp32``, ``openvino-bf16``...), which the reports record per stage.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from iirp.manifest import STAGES, Manifest, StageSpec
from iirp.runtime.engines.options import BackendOptions

__all__ = ["Backend", "BackendFactory", "StageSet", "BACKENDS", "register_backend"]


class Backend(ABC):
    """One stage of the network behind a uniform interface.

    Args:
        name: stage name (``feature_extractor``, ``flow_estimator_K``).
        manifest: the engine folder's manifest; ``manifest.stages[name]`` gives I/O names,
            shapes and dtypes.
        folder: the engine folder the files live in.
        device: ``cpu`` or ``cuda[:N]``.
        options: precision, threads and cache folder (defaults when None).
    """

    #: registered engine name, set by :func:`register_backend`
    backend_name = "?"

    def __init__(
        self, name: str, manifest: Manifest, folder: Path, device: str, options: Optional[BackendOptions] = None
    ) -> None:
        self.name = name
        self.manifest = manifest
        self.spec: StageSpec = manifest.stages[name]
        self.folder = folder
        self.device = device
        self.options = options or BackendOptions()
        self.active = False

    @property
    def runs_on(self) -> str:
        """What computes this stage: ``<backend>-<precision>`` (e.g. ``ort-fp32``, ``openvino-bf16``)."""
        return f"{self.backend_name}-{self.manifest.precision}"

    def __enter__(self) -> "Backend":
        self._activate()
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False
        self._release()

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the stage on float32 host arrays; returns float32 host arrays.

        Raises:
            RuntimeError: the backend is not active (use it as a context manager).
            ValueError: input names, dtypes or ranks/channel counts differ from the manifest.
        """
        if not self.active:
            raise RuntimeError(f"backend {self.name!r} is not active; use it as a context manager")
        expected = [t.name for t in self.spec.inputs]
        if sorted(feeds) != sorted(expected):
            raise ValueError(f"{self.name}.infer() needs inputs {expected}, got {sorted(feeds)}")
        for tensor in self.spec.inputs:
            array = feeds[tensor.name]
            if array.dtype != np.dtype(tensor.dtype):
                raise ValueError(f"{self.name}.infer() '{tensor.name}' must be {tensor.dtype}, got {array.dtype}")
            fixed_dims = [(i, d) for i, d in enumerate(tensor.shape) if isinstance(d, int)]
            if array.ndim != len(tensor.shape) or any(array.shape[i] != d for i, d in fixed_dims):
                raise ValueError(
                    f"{self.name}.infer() '{tensor.name}' must have shape {tuple(tensor.shape)}, got {array.shape}"
                )
        return self._infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _release(self) -> None: ...

    @abstractmethod
    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


#: ``(stage name, manifest, folder, device, options) -> Backend``
BackendFactory = Callable[[str, Manifest, Path, str, Optional[BackendOptions]], Backend]
#: engine name -> backend class; filled by the backend modules on import.
BACKENDS: dict[str, BackendFactory] = {}


def register_backend(engine: str) -> Callable[[type[Backend]], type[Backend]]:
    """Class decorator registering a backend under an engine name."""

    def _register(cls: type[Backend]) -> type[Backend]:
        cls.backend_name = engine
        BACKENDS[engine] = cls
        return cls

    return _register


class StageSet:
    """All five stages of one engine folder, entered and exited together.

    Args:
        manifest: the folder's manifest (already checked).
        folder: the engine folder.
        engine: registered backend name.
        device: ``cpu`` or ``cuda[:N]``.
        options: passed to every backend.
    """

    def __init__(
        self, manifest: Manifest, folder: Path, engine: str, device: str, options: Optional[BackendOptions] = None
    ) -> None:
        factory = BACKENDS[engine]
        self.stages = {name: factory(name, manifest, folder, device, options) for name in STAGES}

    def __enter__(self) -> "StageSet":
        entered: list[Backend] = []
        try:
            for backend in self.stages.values():
                entered.append(backend.__enter__())
        except BaseException:
            for backend in entered:
                backend.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for backend in self.stages.values():
            backend.__exit__(None, None, None)

    def __getitem__(self, name: str) -> Backend:
        return self.stages[name]

    def runs_on(self) -> dict[str, str]:
        """Stage name -> what computes it (:attr:`Backend.runs_on`); meaningful once entered."""
        return {name: backend.runs_on for name, backend in self.stages.items()}
