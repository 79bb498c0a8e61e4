"""Register an image pair from files: geometry in, IIRP flow, files other tools read out.

Steps (see :mod:`iirp.runtime.geometry` for the conventions):

1. read and validate every input before anything is written;
2. normalise intensities, bring both images to the model orientation losslessly;
3. choose the model grid (the fixed image itself when it already has the
   model's size and spacing, else a grid centred on its foreground);
4. optional pre-alignment (``affine`` registration or an ITK transform file);
5. resample onto the model grid where needed, run the flow solver;
6. build the displacement field on the fixed image's own grid, warp the
   moving image (and labels) through it, and write everything atomically.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import SimpleITK as sitk

import iirp
from iirp.atomic import check_free_space
from iirp.errors import OutputError, RegistrationError
from iirp.iterstop import DEFAULT_DELTA, DEFAULT_MAX_ITERS, IterStopRule, parse_iterstop
from iirp.manifest import ContractError, ModelContract
from iirp.runtime.affine import read_transform, register_affine
from iirp.runtime.deformation import (
    apply_field,
    displacement_field,
    folding_fraction,
    folding_fraction_of_flow,
    is_reoriented_grid,
    warp_on_model_grid,
)
from iirp.runtime.geometry import ModelGrid, array_from_image, model_grid_for, orient, same_grid
from iirp.runtime.imageio import REGISTRATION_OUTPUTS, AtomicOutputDir, check_output_dir, read_image, read_labels
from iirp.runtime.intensity import IntensityRule, normalize, parse_intensity
from iirp.runtime.solvers import FlowSolver
from iirp.typing import PathLike

__all__ = [
    "RegistrationOptions", "PreparedPair", "Registration", "PairInputs", "prepare_pair", "read_inputs",
    "register_images", "register_files", "write_registration", "output_bytes", "file_record",
]


@dataclass(frozen=True)
class RegistrationOptions:
    """User choices for one registration, parsed once, when the object is built.

    Attributes:
        iterstop: the IterStop rule: an :class:`~iirp.iterstop.IterStopRule`, or its spec
            (``official | paper | rpnet | fixed:a,b,c,d``), parsed with ``delta`` and ``max_iters``.
            Always an ``IterStopRule`` once built.
        delta: IterStop threshold (used when ``iterstop`` is a spec).
        max_iters: maximum passes per level (used when ``iterstop`` is a spec).
        intensity: an :class:`~iirp.runtime.intensity.IntensityRule` or its spec
            (``minmax | percentile:LO,HI | window:LO,HI``); None uses the model's own rule
            (:attr:`~iirp.manifest.ModelContract.intensity`).
        affine: run rigid-then-affine pre-alignment.
        initial_transform: ITK transform file (fixed -> moving) used instead of ``affine``.
        spacing: model grid spacing in mm ``(x, y, z)`` for a model that records none; None uses the
            model's. A spacing that contradicts the model's record is an error
            (:meth:`~iirp.manifest.ModelContract.with_spacing`).

    Raises:
        IterStopSpecError, IntensitySpecError, ContractError: a malformed spec or spacing (on construction).
    """

    iterstop: Union[str, IterStopRule] = "official"
    delta: float = DEFAULT_DELTA
    max_iters: int = DEFAULT_MAX_ITERS
    intensity: Union[str, IntensityRule, None] = None
    affine: bool = False
    initial_transform: Optional[PathLike] = None
    spacing: Optional[tuple[float, float, float]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.iterstop, IterStopRule):
            object.__setattr__(self, "iterstop", parse_iterstop(str(self.iterstop), self.delta, self.max_iters))
        if self.intensity is not None and not isinstance(self.intensity, IntensityRule):
            object.__setattr__(self, "intensity", parse_intensity(str(self.intensity)))
        if self.spacing is not None:
            spacing = tuple(float(v) for v in self.spacing)
            if len(spacing) != 3 or not all(0 < v < float("inf") for v in spacing):
                raise ContractError(f"--spacing must be a positive number of mm, got {self.spacing!r}")
            object.__setattr__(self, "spacing", spacing)

    @property
    def rule(self) -> IterStopRule:
        """The IterStop rule (typed)."""
        assert isinstance(self.iterstop, IterStopRule)
        return self.iterstop

    def intensity_rule(self, contract: ModelContract) -> IntensityRule:
        """The intensity rule of this run: the option, else the model's."""
        if isinstance(self.intensity, IntensityRule):
            return self.intensity
        return parse_intensity(contract.intensity)


@dataclass
class PreparedPair:
    """A pair on the model grid, ready for a solver.

    Attributes:
        fixed, moving: ``(X, Y, Z)`` float32 in [0, 1], model grid, NIfTI (i, j, k) order.
        grid: the model grid.
        voxel_for_voxel: the fixed image was used without resampling.
        pre_alignment: fixed -> moving transform the moving image was resampled with, or None.
        intensity: the intensity rule used (its spec).
        warnings: what the preparation found questionable but not fatal (a small overlap).
    """

    fixed: np.ndarray
    moving: np.ndarray
    grid: ModelGrid
    voxel_for_voxel: bool
    pre_alignment: Optional[sitk.Transform]
    intensity: str = "minmax"
    warnings: list[str] = dataclasses.field(default_factory=list)


def _on_grid(image: sitk.Image, grid: ModelGrid, transform: Optional[sitk.Transform]) -> np.ndarray:
    """Linear resampling of a normalised image onto ``grid`` (0 outside), as an (X, Y, Z) array."""
    resampled = sitk.Resample(
        image, grid.reference_image(), transform or sitk.Transform(3, sitk.sitkIdentity),
        sitk.sitkLinear, 0.0, sitk.sitkFloat32,
    )
    return array_from_image(resampled)


def prepare_pair(
    fixed: sitk.Image,
    moving: sitk.Image,
    model: Union[ModelContract, tuple[int, int, int]],
    options: RegistrationOptions,
    timings_ms: Optional[dict[str, float]] = None,
    names: tuple[str, str] = ("fixed image", "moving image"),
    initial: Optional[sitk.Transform] = None,
) -> PreparedPair:
    """Steps 2-5a above for two float32 images as read.

    Args:
        model: the model's :class:`~iirp.manifest.ModelContract` (a solver's ``contract``), or just its grid
            size ``(X, Y, Z)`` for a 1 mm RAS minmax model.
        names: how error messages name the two images.
        initial: an already read ``options.initial_transform`` (read here when None).

    Raises:
        ImageError / TransformError / RegistrationError / ContractError: see the helpers.
    """
    contract = model if isinstance(model, ModelContract) else ModelContract(tuple(model), recorded=False)  # type: ignore[arg-type]
    contract = contract.with_spacing(options.spacing)
    timings = timings_ms if timings_ms is not None else {}
    t0 = time.perf_counter()
    rule = options.intensity_rule(contract)
    fixed_n = normalize(fixed, rule, names[0])
    moving_n = normalize(moving, rule, names[1])
    fixed_o, moving_o = orient(fixed_n, contract.orientation), orient(moving_n, contract.orientation)
    grid, voxel_for_voxel = model_grid_for(fixed_o, contract.size, contract.spacing, contract.orientation)
    t1 = time.perf_counter()

    pre_alignment: Optional[sitk.Transform] = None
    if options.initial_transform is not None:
        pre_alignment = initial if initial is not None else read_transform(options.initial_transform)
    elif options.affine:
        pre_alignment = register_affine(fixed_n, moving_n)
    t2 = time.perf_counter()

    fixed_array = array_from_image(fixed_o) if voxel_for_voxel else _on_grid(fixed_n, grid, None)
    if pre_alignment is None and same_grid(moving_o, grid):
        moving_array = array_from_image(moving_o)
    else:
        moving_array = _on_grid(moving_n, grid, pre_alignment)
    t3 = time.perf_counter()
    timings["preprocess"] = (t1 - t0 + t3 - t2) * 1e3
    if pre_alignment is not None:
        timings["affine"] = (t2 - t1) * 1e3
    pair = PreparedPair(fixed_array, moving_array, grid, voxel_for_voxel, pre_alignment, intensity=rule.spec)
    pair.warnings.extend(_overlap(pair, names))
    return pair


#: Normalised intensity above which a fixed-image voxel counts as foreground for the overlap check.
FOREGROUND_LEVEL = 0.1
#: Below this share of the fixed foreground covered by the moving image, the result carries a warning.
MIN_COVERAGE = 0.5


def _overlap(pair: PreparedPair, names: tuple[str, str]) -> list[str]:
    """Refuse a pair whose images do not meet on the model grid; a warning for a small overlap.

    Intensities are normalised to [0, 1]; foreground is above :data:`FOREGROUND_LEVEL`.

    Raises:
        RegistrationError: no foreground of the moving (or fixed) image lies on the model grid, e.g. the
            moving image lies elsewhere in space, has an absurd spacing, or the pre-alignment moves it away:
            there is nothing to register.
    """
    for array, name in ((pair.moving, names[1]), (pair.fixed, names[0])):
        if not float(array.max()) > FOREGROUND_LEVEL:
            raise RegistrationError(
                f"{name} does not overlap the fixed image: none of its foreground lies on the model grid (after "
                "the pre-alignment); check the images' origin, spacing and direction, or pass --affine"
            )
    foreground = pair.fixed > FOREGROUND_LEVEL
    coverage = float(np.count_nonzero(pair.moving[foreground] > FOREGROUND_LEVEL)) / max(
        int(np.count_nonzero(foreground)), 1)
    if coverage < MIN_COVERAGE:
        return [f"{names[1]} covers only {100 * coverage:.0f}% of the fixed image's foreground on the model grid; "
                "check the pre-alignment"]
    return []


@dataclass
class Registration:
    """One registration result, in memory, on the fixed image's own grid.

    Attributes:
        fixed: the fixed image as read (float32).
        moving_before: the moving image on the fixed grid through the pre-alignment only
            (identity when there is none): what "before deformable registration" looks like.
        warped: the moving image through ``field`` (float32, linear).
        field: ITK displacement field (float64 3-vectors, mm, LPS), pre-alignment included.
        warped_seg: the moving labels through ``field`` (nearest neighbour), or None.
        pre_alignment: fixed -> moving transform, or None.
        report: what ``report.json`` holds (without ``outputs``).
    """

    fixed: sitk.Image
    moving_before: sitk.Image
    warped: sitk.Image
    field: sitk.Image
    warped_seg: Optional[sitk.Image]
    pre_alignment: Optional[sitk.Transform]
    report: dict[str, Any]


def register_images(
    fixed: sitk.Image,
    moving: sitk.Image,
    solver: FlowSolver,
    *,
    moving_seg: Optional[sitk.Image] = None,
    options: RegistrationOptions = RegistrationOptions(),
    names: tuple[str, str] = ("fixed image", "moving image"),
    initial: Optional[sitk.Transform] = None,
    timings_ms: Optional[dict[str, float]] = None,
    on_step: Optional[Callable[[str], None]] = None,
) -> Registration:
    """Steps 2-6 above for images already read and validated (:func:`read_image`); writes nothing.

    Args:
        fixed, moving: float32 scalar 3D images.
        solver: any :class:`FlowSolver`; its model grid decides the resampling.
        moving_seg: integer label map on the moving image's grid, or None.
        names: how error messages name the two images.
        initial: an already read ``options.initial_transform``.
        timings_ms: dict the stage times (ms) are added to.
        on_step: called with a short description as each step starts (a progress line); with it, a
            solver whose stages are not built yet builds them as a step of its own.

    Raises:
        IirpError subclasses: see :func:`prepare_pair` and the solver.
    """
    timings = timings_ms if timings_ms is not None else {}
    step = on_step or _no_step
    rule = options.rule
    if moving_seg is not None:
        _check_labels_overlap(moving_seg, moving, names[1])
    step("resampling onto the model grid")
    pair = prepare_pair(fixed, moving, solver.contract, options, timings, names=names, initial=initial)
    warnings = list(pair.warnings)
    load = getattr(solver, "load", None)
    if on_step is not None and callable(load) and getattr(solver, "load_ms", 0.0) is None:
        step(f"loading the models{_LOADING_NOTE.get(solver.engine, '')}")
        timings["load"] = load()
    step("registering")
    trace = solver.solve(pair.moving, pair.fixed, rule)
    timings.update(trace.timings_ms)
    _check_finite(trace, getattr(solver, "source", "the model"))
    step("warping the moving image")

    t0 = time.perf_counter()
    field = displacement_field(trace.flow, pair.grid, fixed, pair.pre_alignment)
    timings["field"] = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    warped, warped_seg, warp_method = _warp_outputs(moving, moving_seg, fixed, field, trace.flow, pair)
    timings["warp"] = (time.perf_counter() - t0) * 1e3
    if warped_seg is not None and not _any_label(warped_seg):
        warnings.append("no label of the moving label map reached the fixed image's grid: warped_seg is empty")
    t0 = time.perf_counter()
    if pair.pre_alignment is None and is_reoriented_grid(pair.grid, fixed):  # the field is the flow, reoriented
        folding = folding_fraction_of_flow(trace.flow, pair.grid)
    else:
        folding = folding_fraction(field)
    timings["folding"] = (time.perf_counter() - t0) * 1e3
    if pair.pre_alignment is None and same_grid(moving, fixed):
        before = moving  # what "before deformable registration" looks like needs no resampling
    else:
        before = sitk.Resample(
            moving, fixed, pair.pre_alignment or sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear, 0.0,
            sitk.sitkFloat32,
        )
    report: dict[str, Any] = {
        "iirp_version": iirp.__version__,
        "engine": solver.engine,
        "precision": getattr(solver, "precision", "fp32"),
        **getattr(solver, "backend_report", {}),  # precision_note, threads, load_ms, stage_backends
        "device": solver.device,
        "source": solver.source,
        "source_sha256": solver.source_sha256,
        "iterstop": rule.name,
        "delta": rule.delta,
        "max_iters": rule.max_iters,
        "iterations": list(trace.iterations),
        "estimator_passes": trace.estimator_passes,
        "scores": trace.scores,
        "folding_fraction": folding,
        "intensity": pair.intensity,
        "pre_alignment": (
            "initial_transform" if options.initial_transform is not None else "affine" if options.affine else None
        ),
        "model_grid": {**pair.grid.to_dict(), "voxel_for_voxel": pair.voxel_for_voxel},
        "warp": warp_method,
        "warnings": warnings,
        "timings_ms": timings,
    }
    return Registration(fixed, before, warped, field, warped_seg, pair.pre_alignment, report)


#: What the progress line adds while an engine's stages are built.
_LOADING_NOTE = {
    "openvino": " (compiled on a machine's first run: ~30 s at full size, then cached)",
}


def _no_step(text: str) -> None:
    """The ``on_step`` of a caller that shows no progress."""


def _warp_outputs(moving: sitk.Image, moving_seg: Optional[sitk.Image], fixed: sitk.Image, field: sitk.Image,
                  flow: np.ndarray, pair: PreparedPair) -> tuple[sitk.Image, Optional[sitk.Image], str]:
    """``(warped, warped_seg, how)``: with the project's kernels where the images lie on the model grid
    (:func:`~iirp.runtime.deformation.warp_on_model_grid`, ``how`` = ``kernels``), else resampled by ITK
    through the displacement field (``itk``)."""
    if pair.pre_alignment is None:
        warped = warp_on_model_grid(moving, flow, pair.grid, fixed)
        warped_seg = warp_on_model_grid(moving_seg, flow, pair.grid, fixed, labels=True) if moving_seg else None
        if warped is not None and (moving_seg is None or warped_seg is not None):
            return warped, warped_seg, "kernels"
    warped = apply_field(moving, fixed, field)
    warped_seg = apply_field(moving_seg, fixed, field, labels=True) if moving_seg is not None else None
    return warped, warped_seg, "itk"


def _check_finite(trace: Any, source: str) -> None:
    """A NaN/Inf flow or score is an error (e.g. a checkpoint or engine with broken weights), never an output.

    Raises:
        RegistrationError: the flow or an IterStop score is not finite.
    """
    if not np.isfinite(trace.flow).all():
        bad = int(np.count_nonzero(~np.isfinite(trace.flow)))
        raise RegistrationError(f"the model ({source}) produced a non-finite flow ({bad} NaN/Inf values); "
                                "its weights or engines may be corrupt")
    scores = [v for level in trace.scores for v in level]
    if not np.isfinite(scores).all():
        raise RegistrationError(f"the model ({source}) produced a non-finite IterStop score")


def _any_label(labels: sitk.Image) -> bool:
    return bool(np.any(sitk.GetArrayViewFromImage(labels)))


def _physical_box(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical bounding box (mm, LPS) of an image's voxel domain, half a voxel beyond the centres."""
    size = np.asarray(image.GetSize(), dtype=np.float64)
    corners = np.array([[(-0.5 if b == 0 else n - 0.5) for b, n in zip(bits, size)]
                        for bits in np.ndindex(2, 2, 2)])
    points = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(c)) for c in corners])
    return points.min(axis=0), points.max(axis=0)


def _check_labels_overlap(labels: sitk.Image, moving: sitk.Image, moving_name: str) -> None:
    """The moving label map must lie where the moving image is.

    Raises:
        RegistrationError: their physical extents do not intersect (labels that could never be warped).
    """
    lo_a, hi_a = _physical_box(labels)
    lo_b, hi_b = _physical_box(moving)
    if np.any(hi_a < lo_b) or np.any(hi_b < lo_a):
        raise RegistrationError(
            f"the moving label map does not overlap {moving_name} in space (its extent "
            f"{np.round(lo_a, 1).tolist()}..{np.round(hi_a, 1).tolist()} mm): is it the moving image's label map?"
        )


@dataclass
class PairInputs:
    """A pair's files, read and validated before any model is loaded (:func:`read_inputs`).

    Attributes:
        fixed, moving: float32 scalar 3D images.
        moving_seg: the moving label map (its own pixel type), or None.
        initial: the ``--initial-transform`` (fixed -> moving points), or None.
        paths: ``fixed``, ``moving``, ``moving_seg``, ``initial_transform`` as given (None where absent).
        read_ms: time spent reading.
    """

    fixed: sitk.Image
    moving: sitk.Image
    moving_seg: Optional[sitk.Image]
    initial: Optional[sitk.Transform]
    paths: dict[str, Optional[str]]
    read_ms: float

    @property
    def names(self) -> tuple[str, str]:
        """How error messages name the two images."""
        return f"fixed image {self.paths['fixed']}", f"moving image {self.paths['moving']}"


def read_inputs(
    fixed_path: PathLike, moving_path: PathLike, *, moving_seg: Optional[PathLike] = None,
    options: RegistrationOptions = RegistrationOptions(),
) -> PairInputs:
    """Read and check every input file of a registration (cheap: no model needed).

    Raises:
        ImageError / TransformError: a missing, unreadable or unusable file (see :func:`read_image`,
            :func:`read_labels`, :func:`~iirp.runtime.affine.read_transform`).
    """
    t0 = time.perf_counter()
    fixed = read_image(fixed_path, "fixed")
    moving = read_image(moving_path, "moving")
    seg = read_labels(moving_seg, "moving-seg") if moving_seg is not None else None
    initial = read_transform(options.initial_transform) if options.initial_transform is not None else None
    paths = {
        "fixed": str(fixed_path),
        "moving": str(moving_path),
        "moving_seg": str(moving_seg) if moving_seg is not None else None,
        "initial_transform": str(options.initial_transform) if options.initial_transform is not None else None,
    }
    return PairInputs(fixed, moving, seg, initial, paths, (time.perf_counter() - t0) * 1e3)


def output_bytes(fixed: sitk.Image, moving_seg: Optional[sitk.Image]) -> int:
    """Disk space the NIfTI outputs need while they are written: all of them uncompressed, plus the largest
    again (it is staged uncompressed, then compressed)."""
    voxels = int(np.prod(fixed.GetSize(), dtype=np.int64))
    sizes = [voxels * 4, voxels * 12]  # warped (float32), displacement (3 x float32)
    if moving_seg is not None:
        sizes.append(voxels * np.dtype(sitk.GetArrayViewFromImage(moving_seg).dtype).itemsize)
    return sum(sizes) + max(sizes) + (1 << 16)


def register_files(
    fixed_path: PathLike,
    moving_path: PathLike,
    solver: FlowSolver,
    out_dir: PathLike,
    *,
    moving_seg: Optional[PathLike] = None,
    options: RegistrationOptions = RegistrationOptions(),
    qc: bool = False,
    overwrite: bool = False,
    inputs: Optional[PairInputs] = None,
    on_step: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Register ``moving`` to ``fixed`` and write the outputs into ``out_dir``.

    Writes ``warped.nii.gz`` (float32, fixed grid), ``displacement.nii.gz`` (ITK
    displacement field, float32 3-vectors, mm, LPS, fixed grid),
    ``warped_seg.nii.gz`` (with ``moving_seg``), ``affine.tfm`` (with a
    pre-alignment), ``qc.png`` (with ``qc``, :mod:`iirp.qc`) and ``report.json``
    (last); all or nothing.

    Args:
        overwrite: replace an earlier run's outputs in ``out_dir``; without it ``out_dir`` must be
            empty or new.
        inputs: the files already read by :func:`read_inputs` (the paths above are then only names).
        on_step: progress callback, see :func:`register_images`.

    Returns:
        The report (also written as ``report.json``).

    Raises:
        IirpError subclasses for any bad input; nothing is written then.
    """
    t_start = time.perf_counter()
    check_output_dir(out_dir, overwrite=overwrite, owned=REGISTRATION_OUTPUTS)
    if inputs is None:
        inputs = read_inputs(fixed_path, moving_path, moving_seg=moving_seg, options=options)
    check_free_space(out_dir, output_bytes(inputs.fixed, inputs.moving_seg))
    timings: dict[str, float] = {"read": inputs.read_ms}
    result = register_images(
        inputs.fixed, inputs.moving, solver, moving_seg=inputs.moving_seg, options=options, names=inputs.names,
        initial=inputs.initial, timings_ms=timings, on_step=on_step,
    )
    report = result.report
    report["inputs"] = dict(inputs.paths)
    (on_step or _no_step)("writing the outputs")
    write_registration(result, out_dir, qc=qc, t_start=t_start, overwrite=overwrite)
    return report


def write_registration(
    result: Registration, out_dir: PathLike, *, qc: bool = False, title: str = "", t_start: Optional[float] = None,
    overwrite: bool = False,
) -> dict[str, str]:
    """Write ``result`` into ``out_dir`` (all or nothing) and record the paths in ``result.report["outputs"]``.

    Every NIfTI file is checked to be complete before the set is published (``report.json`` last);
    ``report["output_files"]`` records each other file's size and sha256 (:func:`file_record`).

    Args:
        overwrite: replace an earlier run's outputs (:data:`~iirp.runtime.imageio.REGISTRATION_OUTPUTS`)
            as a set.
        qc: also write ``qc.png`` (:func:`iirp.qc.write_qc_png`).
        title: the QC picture's title (default: engine, rule and iterations).
        t_start: ``time.perf_counter()`` at the start of the whole run, for ``timings_ms["total"]``.

    Returns:
        Output name -> path.
    """
    out = Path(os.fspath(out_dir))
    report, timings = result.report, result.report["timings_ms"]
    outputs = {"warped": str(out / "warped.nii.gz"), "displacement": str(out / "displacement.nii.gz")}
    if result.warped_seg is not None:
        outputs["warped_seg"] = str(out / "warped_seg.nii.gz")
    if result.pre_alignment is not None:
        outputs["affine"] = str(out / "affine.tfm")
    if qc:
        outputs["qc"] = str(out / "qc.png")
    outputs["report"] = str(out / "report.json")
    report["outputs"] = outputs

    t0 = time.perf_counter()
    with AtomicOutputDir(out_dir, overwrite=overwrite) as stage:
        stage.write_image("warped.nii.gz", result.warped)
        stage.write_image("displacement.nii.gz", sitk.Cast(result.field, sitk.sitkVectorFloat32))
        if result.warped_seg is not None:
            stage.write_image("warped_seg.nii.gz", result.warped_seg)
        if result.pre_alignment is not None:
            transform = result.pre_alignment
            stage.write_with("affine.tfm", lambda p: _write_transform(transform, p))
        if qc:
            from iirp.qc import write_qc_png

            caption = title or (
                f"{report['engine']} ({report['precision']}), IterStop {report['iterstop']}, "
                f"iterations (levels 4..1) {report['iterations']}, folding {report['folding_fraction']:.5f}"
            )
            stage.write_with(
                "qc.png",
                lambda p: write_qc_png(p, result.fixed, result.moving_before, result.warped, result.field, caption),
            )
        report["output_files"] = {name: file_record(path) for name, path in stage.staged().items()}
        timings["write"] = (time.perf_counter() - t0) * 1e3
        if t_start is not None:
            timings["total"] = (time.perf_counter() - t_start) * 1e3
        stage.write_json("report.json", report)
    return outputs


def file_record(path: PathLike) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex digest}`` of a written file: what ``report.json``'s ``output_files``
    records for each output, and what ``iirp-run --resume`` checks the outputs against."""
    from iirp.manifest import sha256_file

    return {"bytes": os.stat(path).st_size, "sha256": sha256_file(path)}


def _write_transform(transform: sitk.Transform, path: str) -> None:
    """``sitk.WriteTransform``, then read back: ITK does not report a short write.

    Raises:
        OutputError: the file cannot be written or read back.
    """
    try:
        sitk.WriteTransform(transform, path)
        sitk.ReadTransform(path)
    except RuntimeError as err:
        raise OutputError(f"cannot write {os.path.basename(path)}: the file is incomplete or unwritable") from err
