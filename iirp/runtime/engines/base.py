"""The backend contract: one network stage, run on arrays where they live.

A backend is a context manager: ``__enter__`` builds the expensive object (ORT session,
OpenVINO compiled model, TensorRT context, torch module on its device) and ``__exit__``
frees it. It is built for a :class:`~iirp.runtime.placement.Placement`: its
:meth:`Backend.infer` takes ``{input name: array}`` and returns ``{output name: array}`` with
every array on that placement (numpy on the host, CuPy on a CUDA device) and every launch on
the placement's stream; nothing is copied between host and device. The base class checks
activity, names, dtypes and fixed dims against the manifest's
:class:`~iirp.manifest.StageSpec`, then calls the subclass's ``_infer``.

Outputs: a backend with :attr:`Backend.reuses_outputs` writes every call's outputs into the
same buffers (allocated once per shape: TensorRT, onnxruntime CUDA), so an output is valid
until that stage runs again; the others return arrays no later call overwrites.

Every backend gets the user's :class:`~iirp.runtime.engines.options.BackendOptions`
(precision, threads, cache folder) and says what it runs on in :attr:`Backend.runs_on`
(``ort-fp32``, ``openvino-bf16``, ``trt-fp16``...), which the reports record per stage.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from iirp.errors import IirpError
from iirp.manifest import STAGES, Manifest, StageSpec
from iirp.runtime.engines.options import BackendOptions
from iirp.runtime.placement import HOST, Placement, make_placement
from iirp.runtime.slabs import WarpedInput

__all__ = ["Backend", "BackendFactory", "StageSet", "BACKENDS", "register_backend", "output_shapes"]


class Backend(ABC):
    """One stage of the network behind a uniform interface.

    Args:
        name: stage name (``feature_extractor``, ``flow_estimator_K``).
        manifest: the model's manifest; ``manifest.stages[name]`` gives I/O names, shapes and dtypes.
        folder: the engine folder the stage files live in (None for torch stages built from a checkpoint).
        placement: where the arrays live (:data:`~iirp.runtime.placement.HOST` by default; a device string
            such as ``"cpu"`` or ``"cuda:0"`` is turned into its placement).
        options: precision, threads and cache folder (defaults when None).

    Raises:
        IirpError: the backend does not run on ``placement``'s kind of device.
    """

    #: registered engine name, set by :func:`register_backend`
    backend_name = "?"
    #: the device kinds (``cpu``, ``cuda``) this backend runs on
    device_kinds: tuple[str, ...] = ("cpu",)
    #: whether outputs live in buffers that the next call of this stage overwrites
    reuses_outputs = False

    @property
    def takes_warped_input(self) -> bool:
        """Whether :meth:`infer` computes a :class:`~iirp.runtime.slabs.WarpedInput` slab by slab (a stage run
        in slabs); any other backend gets the whole warp."""
        return False

    def __init__(
        self, name: str, manifest: Manifest, folder: Optional[Path], placement: Union[Placement, str] = HOST,
        options: Optional[BackendOptions] = None,
    ) -> None:
        if not isinstance(placement, Placement):
            placement = make_placement(placement)
        self.name = name
        self.manifest = manifest
        self.spec: StageSpec = manifest.stages[name]
        self.folder = folder
        self.placement = placement
        self.options = options or BackendOptions()
        self.active = False
        if placement.device.kind not in self.device_kinds:
            raise IirpError(
                f"engine {self.backend_name!r} runs on {' or '.join(self.device_kinds)}, not on {placement.device}"
            )

    @property
    def device(self) -> str:
        """``cpu`` or ``cuda:N``."""
        return str(self.placement.device)

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

    def infer(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run the stage on float32 arrays of this backend's placement; returns arrays of the same placement.

        Host inputs of another layout are made C-contiguous (a copy); device inputs must already be. A
        :class:`~iirp.runtime.slabs.WarpedInput` is computed slab by slab where :attr:`takes_warped_input`,
        else whole first.

        Raises:
            RuntimeError: the backend is not active (use it as a context manager).
            ValueError: input names, dtypes, ranks, fixed dims or layout differ from the contract.
        """
        if not self.active:
            raise RuntimeError(f"backend {self.name!r} is not active; use it as a context manager")
        expected = [t.name for t in self.spec.inputs]
        if sorted(feeds) != sorted(expected):
            raise ValueError(f"{self.name}.infer() needs inputs {expected}, got {sorted(feeds)}")
        for tensor in self.spec.inputs:
            array = feeds[tensor.name]
            if np.dtype(array.dtype) != np.dtype(tensor.dtype):
                raise ValueError(f"{self.name}.infer() '{tensor.name}' must be {tensor.dtype}, got {array.dtype}")
            fixed_dims = [(i, d) for i, d in enumerate(tensor.shape) if isinstance(d, int)]
            if array.ndim != len(tensor.shape) or any(array.shape[i] != d for i, d in fixed_dims):
                raise ValueError(
                    f"{self.name}.infer() '{tensor.name}' must have shape {tuple(tensor.shape)}, "
                    f"got {tuple(array.shape)}"
                )
            if not self.placement.is_host and not array.flags.c_contiguous:
                raise ValueError(f"{self.name}.infer() '{tensor.name}' must be C-contiguous on the device")
        if any(isinstance(v, WarpedInput) for v in feeds.values()) and not self.takes_warped_input:
            feeds = {k: v.whole() if isinstance(v, WarpedInput) else v for k, v in feeds.items()}
        if self.placement.is_host:
            feeds = {k: v if isinstance(v, WarpedInput) else np.ascontiguousarray(v) for k, v in feeds.items()}
        return self._infer(feeds)

    def trim(self) -> None:  # noqa: B027 - a no-op unless the backend keeps memory
        """Free the working memory the backend keeps between calls (intermediate buffers), keeping the loaded
        model and every output array already returned; the next call allocates again.

        The pipeline trims each stage once it is done with it for a pair, so the stages' working memory
        does not add up (at 160x192x160 OpenVINO keeps ~1.2 GB after the finest flow estimator alone).
        Default: nothing kept, nothing to free.
        """

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _release(self) -> None: ...

    @abstractmethod
    def _infer(self, feeds: dict[str, Any]) -> dict[str, Any]: ...


def output_shapes(spec: StageSpec, feeds: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The output shapes of a stage for these inputs: symbolic dims (``X``, ``Y/2``...) solved from the inputs.

    Raises:
        ValueError: the inputs do not determine a symbol the outputs use.
    """
    sizes: dict[str, int] = {}
    for tensor in spec.inputs:
        for dim, extent in zip(tensor.shape, feeds[tensor.name].shape):
            if isinstance(dim, str):
                symbol, _, divisor = dim.partition("/")
                sizes.setdefault(symbol, int(extent) * int(divisor or 1))
    try:
        return {t.name: t.resolve(sizes) for t in spec.outputs}
    except KeyError as err:
        raise ValueError(f"output_shapes(): the inputs of {spec.file} do not give the size {err}") from err


#: ``(stage name, manifest, folder, placement, options) -> Backend``
BackendFactory = Callable[[str, Manifest, Optional[Path], Placement, Optional[BackendOptions]], Backend]
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
    """All five stages of one model, entered and exited together, on one placement.

    Args:
        manifest: the model's manifest (already checked).
        folder: the engine folder (None for torch stages built from a checkpoint).
        engine: registered backend name.
        placement: where the arrays live.
        options: passed to every backend.
    """

    def __init__(
        self, manifest: Manifest, folder: Optional[Path], engine: str, placement: Placement = HOST,
        options: Optional[BackendOptions] = None,
    ) -> None:
        factory = BACKENDS[engine]
        self.placement = placement
        self.stages = {name: factory(name, manifest, folder, placement, options) for name in STAGES}

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

    def trim(self) -> None:
        """:meth:`Backend.trim` every stage, the feature extractor last: an estimator's kept state (e.g. an
        OpenVINO request's shared inputs) may view the features."""
        for backend in reversed(self.stages.values()):
            backend.trim()

    def runs_on(self) -> dict[str, str]:
        """Stage name -> what computes it (:attr:`Backend.runs_on`); meaningful once entered."""
        return {name: backend.runs_on for name, backend in self.stages.items()}
