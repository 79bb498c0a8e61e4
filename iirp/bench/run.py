"""The two ``iirp-bench`` jobs end to end: load, measure, write the reports.

* :func:`latency_benchmark`: every requested engine of an export folder and the
  PyTorch reference on one pair, timed in the same run (:mod:`iirp.bench.latency`).
* :func:`accuracy_benchmark`: every method on every labelled pair of a CSV
  (:mod:`iirp.bench.accuracy`), with optional QC pictures.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from iirp.devices import parse_device
from iirp.errors import IirpError
from iirp.typing import PathLike

__all__ = ["BenchOptionError", "latency_benchmark", "accuracy_benchmark"]


class BenchOptionError(IirpError, ValueError):
    """A malformed ``iirp-bench`` option (counts, engine names)."""


def _prepared_pair(pair: Optional[tuple[PathLike, PathLike]], shape: tuple[int, int, int],
                   intensity: Optional[str], contract: Any) -> tuple[Any, Any, str]:
    from iirp.runtime.imageio import read_image
    from iirp.runtime.register import RegistrationOptions, prepare_pair

    if pair is None:
        return _builtin_pair(shape)
    fixed_path, moving_path = pair
    name = f"{fixed_path} <- {moving_path}"
    fixed = read_image(fixed_path, "fixed")
    moving = read_image(moving_path, "moving")
    prepared = prepare_pair(fixed, moving, replace(contract, size=tuple(shape)),
                            RegistrationOptions(intensity=intensity),
                            names=(f"fixed image {fixed_path}", f"moving image {moving_path}"))
    return prepared.moving, prepared.fixed, name


def _builtin_pair(shape: tuple[int, int, int]) -> tuple[Any, Any, str]:
    """The demo pair (:func:`iirp.demo.make_demo_pair`'s deformation of the packaged template) on ``shape``.

    On the demo grid it is the demo pair itself; on any other grid the same pair resampled
    (linear, corners aligned) to ``shape``: a brain-like synthetic pair at the engines' shape.
    Returns ``(moving, fixed, name)``, ``(X, Y, Z)`` float32 in [0, 1].
    """
    import SimpleITK as sitk

    from iirp.demo.run import DEMO_MAX_DISPLACEMENT, DEMO_SEED, DEMO_SHAPE, demo_file
    from iirp.runtime.geometry import array_from_image
    from iirp.synthetic import make_pair

    with demo_file("icbm152_t1.nii.gz") as t1_path:
        volume = array_from_image(sitk.ReadImage(str(t1_path))) / np.float32(255.0)
    pair = make_pair(volume, DEMO_SEED, max_displacement=DEMO_MAX_DISPLACEMENT)
    if tuple(shape) == DEMO_SHAPE:
        return pair.moving, pair.fixed, f"built-in demo pair (ICBM 2009a template, known deformation, seed {DEMO_SEED})"
    name = (f"synthetic: the built-in demo pair (seed {DEMO_SEED}) resampled from "
            f"{'x'.join(map(str, DEMO_SHAPE))} to {'x'.join(map(str, shape))}")
    return _resized(pair.moving, shape), _resized(pair.fixed, shape), name


def _resized(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``(X, Y, Z)`` volume resampled linearly to ``shape`` with corner voxels aligned, clipped to [0, 1]."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.transpose(2, 1, 0)))  # (z, y, x) -> size (x, y, z)
    spacing = [(n - 1) / max(m - 1, 1) for n, m in zip(volume.shape, shape)]
    out = sitk.Resample(image, [int(m) for m in shape], sitk.Transform(), sitk.sitkLinear, (0.0, 0.0, 0.0), spacing,
                        image.GetDirection(), 0.0, sitk.sitkFloat32)
    return np.clip(sitk.GetArrayFromImage(out).transpose(2, 1, 0), 0.0, 1.0).astype(np.float32)


def _engine_rows(names: Sequence[str]) -> list[tuple[str, Optional[str]]]:
    """``--engine`` values -> ``(engine, precision)`` rows: ``openvino`` is fp32 plus bf16 where it is native.

    Raises:
        BenchOptionError: an unknown engine or precision suffix.
        OpenVinoPrecisionError: ``openvino-bf16`` on a CPU without native bf16.
    """
    from iirp.runtime.engines import BACKENDS

    rows: list[tuple[str, Optional[str]]] = []
    for name in dict.fromkeys(names):  # keeps order, drops repeats
        engine, _, precision = name.partition("-")
        if engine not in BACKENDS or (precision and (engine != "openvino" or precision not in ("fp32", "bf16"))):
            raise BenchOptionError(
                f"latency_benchmark() 'engines' (--engine) must be one of {', '.join(sorted(BACKENDS))}, "
                f"openvino-fp32 or openvino-bf16, got {name!r}"
            )
        if engine == "openvino" and precision != "fp32":
            from iirp.runtime.engines.openvino import cpu_has_native_bf16, select_precision

            native = cpu_has_native_bf16()
            if precision == "bf16" and not native:
                select_precision("bf16", bf16_native=False, gate=None)  # raises the one-line error
            rows += [("openvino", "fp32")] * (not precision) + [("openvino", "bf16")] * native
        else:
            rows.append((engine, precision or None))
    return list(dict.fromkeys(rows))


def _maker(make_solver: Callable[..., Any], engine: str, folder: Path, device: str, options: Any) -> Callable[[], Any]:
    """A solver factory that also builds the stages, so that their load is timed as such (not in the first run)."""

    def make() -> Any:
        solver = make_solver(engine, engines=folder, device=device, options=options)
        load = getattr(solver, "load", None)
        if load is not None:
            load()
        return solver

    return make


def latency_benchmark(
    out: PathLike,
    engines_dir: PathLike,
    *,
    engines: Sequence[str] = ("ort", "openvino"),
    device: str = "cpu",
    checkpoint: Optional[PathLike] = None,
    shape: Optional[tuple[int, int, int]] = None,
    pair: Optional[tuple[PathLike, PathLike]] = None,
    repeats: int = 3,
    warmup: int = 1,
    iterstop: str = "official",
    intensity: Optional[str] = None,
    threads: Optional[int] = None,
    on_step: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Time the reference and ``engines`` over ``engines_dir``; write ``latency.{json,md,png}`` into ``out``.

    Args:
        engines: engine names for :func:`iirp.runtime.make_solver` (``ort``, ``openvino``, ``trt``, ``torch``);
            ``openvino`` gives an fp32 row and, where the CPU computes bf16 natively, a bf16 row
            (``openvino-fp32`` / ``openvino-bf16`` ask for one).
        device: ``cpu`` or ``cuda[:N]``; the reference runs there too.
        checkpoint: the reference's checkpoint when the manifest's source path is not on this machine.
        shape: model grid ``(X, Y, Z)``; default the folder's (a dynamic export accepts others in its range).
        pair: ``(fixed, moving)`` image files; default the built-in demo pair, resampled to the
            grid when the grid is not the demo's (:func:`_builtin_pair`).
        repeats: timed runs per engine (>= 1); warmup: untimed runs per engine first (>= 0).
        threads: CPU threads of every engine and the reference (None: all cores).

    Returns:
        The report payload (also ``latency.json``).

    Raises:
        BenchOptionError: bad counts or engine names (checked before anything is loaded).
        IirpError subclasses: bad folder, checkpoint, pair or engine.
    """
    from iirp.bench.environment import environment
    from iirp.bench.latency import STAGES, EngineSpec, measure_latency
    from iirp.bench.reports import write_latency_report
    from iirp.iterstop import parse_iterstop
    from iirp.manifest import Manifest
    from iirp.runtime.engines.options import BackendOptions
    from iirp.runtime.imageio import check_output_dir
    from iirp.runtime.solvers import ReferenceSolver, make_solver

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise BenchOptionError(f"latency_benchmark() 'repeats' (--repeats) must be an integer >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise BenchOptionError(f"latency_benchmark() 'warmup' (--warmup) must be an integer >= 0, got {warmup!r}")
    base = BackendOptions(threads=threads)
    out_path = check_output_dir(out)
    folder = Path(os.fspath(engines_dir))
    rule = parse_iterstop(iterstop)
    manifest = Manifest.load(folder)
    grid = tuple(shape) if shape is not None else manifest.size
    manifest.check_input_shape(grid)
    rows = _engine_rows(engines)
    ckpt = manifest.source_checkpoint(checkpoint)
    env = environment()
    moving, fixed, pair_name = _prepared_pair(pair, grid, intensity, manifest.contract)  # type: ignore[arg-type]

    specs = [EngineSpec("reference", lambda: ReferenceSolver(ckpt, device, base, contract=manifest.contract),
                        baseline=True,
                        cuda=parse_device(device).is_cuda)]
    for name, precision in rows:
        options = BackendOptions(precision=precision or "auto", threads=threads)
        specs.append(EngineSpec(f"{name}-{precision or manifest.precision}",
                                _maker(make_solver, name, folder, device, options), cuda=parse_device(device).is_cuda))
    results = measure_latency(specs, moving, fixed, rule, repeats=repeats, warmup=warmup, on_step=on_step)
    reference = next(r for r in results if r.baseline)
    payload = {
        "config": {"engines_dir": str(folder), "checkpoint": str(ckpt), "device": device, "shape": list(grid),
                   "pair": pair_name, "iterstop": rule.name, "repeats": repeats, "warmup": warmup,
                   "intensity": intensity or manifest.contract.intensity, "threads": threads,
                   "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
        "environment": env,
        "stage_order": list(STAGES),
        "memory_note": ("CUDA: torch.cuda.max_memory_allocated during a run (torch allocations only)."
                        if parse_device(device).is_cuda else
                        "peak growth of the process's resident set during a run (sampled every 5 ms)."),
        "engines": [r.summary(reference) for r in results],
    }
    write_latency_report(out_path, payload)
    return payload


def accuracy_benchmark(
    out: PathLike,
    pairs_csv: PathLike,
    *,
    engines_dir: Optional[PathLike] = None,
    checkpoint: Optional[PathLike] = None,
    engine: Optional[str] = None,
    device: str = "cpu",
    methods: str = "identity,rpnet,official",
    options: Any = None,
    qc: bool = False,
    on_step: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Every method on every pair of ``pairs_csv``; write ``accuracy.{json,md}``, ``accuracy_dice.png``.

    Args:
        engines_dir / checkpoint: exactly one: an export folder (engine default ``ort``) or a checkpoint
            (engine ``torch``, the reference).
        methods: comma-separated: ``identity`` (affine only), ``rpnet``, ``official``, ``paper``,
            ``fixed:a,b,c,d``.
        options: :class:`~iirp.runtime.register.RegistrationOptions` (intensity, pre-alignment).
        qc: also write ``qc/<pair>_<method>.png``.

    Returns:
        The report payload (also ``accuracy.json``).
    """
    from iirp.bench.accuracy import METHOD_LABELS, MethodResult, evaluate_pairs, parse_methods, qc_name, summarize
    from iirp.bench.environment import environment
    from iirp.bench.reports import write_accuracy_report
    from iirp.qc import write_qc_png
    from iirp.runtime.imageio import check_output_dir
    from iirp.runtime.pairs import read_pairs
    from iirp.runtime.register import Registration, RegistrationOptions
    from iirp.runtime.solvers import default_engine, make_solver

    options = options or RegistrationOptions()
    out_path = check_output_dir(out)
    method_list = parse_methods(methods)
    pairs = read_pairs(pairs_csv, need_segs=True)
    solver = make_solver(engine or default_engine(checkpoint, engines_dir), checkpoint=checkpoint,
                         engines=engines_dir, device=device)
    qc_dir = out_path / "qc"

    def on_result(result: MethodResult, reg: Registration) -> None:
        if qc:
            qc_dir.mkdir(parents=True, exist_ok=True)
            method = METHOD_LABELS.get(result.method, result.method)
            title = (f"{result.pair}: {method}, Dice {result.metrics.dice:.4f}, "
                     f"iterations {result.iterations}, folding {100 * result.metrics.folding_fraction:.4f} %")
            write_qc_png(qc_dir / qc_name(result), reg.fixed, reg.moving_before, reg.warped, reg.field, title)

    results = evaluate_pairs(pairs, solver, method_list, options, on_result=on_result, on_step=on_step)
    payload = {
        "config": {"source": solver.source, "source_sha256": solver.source_sha256, "engine": solver.engine,
                   "precision": getattr(solver, "precision", "fp32"), "device": solver.device,
                   "intensity": options.intensity_rule(solver.contract).spec,
                   "pre_alignment": "affine" if options.affine else (
                       "initial_transform" if options.initial_transform else None),
                   "pairs_csv": str(pairs_csv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
        "environment": environment(),
        "methods": method_list,
        "pairs": [{"id": p.id, "fixed": str(p.fixed), "moving": str(p.moving),
                   "labels": next((r.labels for r in results if r.pair == p.id), 0)} for p in pairs],
        "results": [r.to_dict() for r in results],
        "summary": summarize(results, method_list),
    }
    write_accuracy_report(out_path, payload, METHOD_LABELS)
    return payload
