"""The two ``iirp-bench`` jobs end to end: load, measure, write the reports.

* :func:`latency_benchmark`: every requested engine of an export folder and the
  PyTorch reference on one pair, timed in the same run (:mod:`iirp.bench.latency`).
* :func:`accuracy_benchmark`: every method on every labelled pair of a CSV
  (:mod:`iirp.bench.accuracy`), with optional QC pictures.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from iirp.errors import IirpError
from iirp.typing import PathLike

__all__ = ["latency_benchmark", "accuracy_benchmark", "reference_checkpoint"]


def reference_checkpoint(engines_dir: Path, checkpoint: Optional[PathLike]) -> Path:
    """The checkpoint an export folder came from (or ``checkpoint``), its sha256 checked against the manifest.

    Raises:
        ManifestMismatchError: the checkpoint is missing or is not the folder's source.
    """
    from iirp.manifest import Manifest, ManifestMismatchError, sha256_file

    manifest = Manifest.load(engines_dir)
    path = Path(os.fspath(checkpoint)) if checkpoint is not None else Path(manifest.source_path or "")
    if not path.is_file():
        raise ManifestMismatchError(
            f"the reference needs the checkpoint {engines_dir} was exported from ({manifest.source_path!r}), "
            "which is missing: pass it with --checkpoint"
        )
    if sha256_file(path) != manifest.source_sha256:
        raise ManifestMismatchError(
            f"checkpoint {path} is not the one {engines_dir} was exported from (sha256 differs)"
        )
    return path


def _prepared_pair(pair: Optional[tuple[PathLike, PathLike]], shape: tuple[int, int, int],
                   intensity: str) -> tuple[Any, Any, str]:
    from iirp.runtime.imageio import read_image
    from iirp.runtime.register import RegistrationOptions, prepare_pair

    if pair is None:
        raise IirpError("give the pair to time with --pair FIXED MOVING")
    fixed_path, moving_path = pair
    name = f"{fixed_path} <- {moving_path}"
    fixed = read_image(fixed_path, "fixed")
    moving = read_image(moving_path, "moving")
    prepared = prepare_pair(fixed, moving, shape, RegistrationOptions(intensity=intensity),
                            names=(f"fixed image {fixed_path}", f"moving image {moving_path}"))
    return prepared.moving, prepared.fixed, name


def latency_benchmark(
    out: PathLike,
    engines_dir: PathLike,
    *,
    engines: Sequence[str] = ("ort",),
    device: str = "cpu",
    checkpoint: Optional[PathLike] = None,
    shape: Optional[tuple[int, int, int]] = None,
    pair: Optional[tuple[PathLike, PathLike]] = None,
    repeats: int = 3,
    warmup: int = 1,
    iterstop: str = "official",
    intensity: str = "minmax",
    on_step: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Time the reference and ``engines`` over ``engines_dir``; write ``latency.{json,md,png}`` into ``out``.

    Args:
        engines: engine names for :func:`iirp.runtime.make_solver` (``ort``, ``trt``, ``torch``).
        device: ``cpu`` or ``cuda[:N]``; the reference runs there too.
        checkpoint: the reference's checkpoint when the manifest's source path is not on this machine.
        shape: model grid ``(X, Y, Z)``; default the folder's (a dynamic export accepts others in its range).
        pair: ``(fixed, moving)`` image files (required).

    Returns:
        The report payload (also ``latency.json``).

    Raises:
        IirpError subclasses: bad folder, checkpoint, pair or engine; ValueError: bad counts.
    """
    from iirp.bench.environment import environment
    from iirp.bench.latency import STAGES, EngineSpec, measure_latency
    from iirp.bench.reports import write_latency_report
    from iirp.iterstop import parse_iterstop
    from iirp.manifest import Manifest
    from iirp.runtime.imageio import check_output_dir
    from iirp.runtime.solvers import TorchSolver, make_solver

    out_path = check_output_dir(out)
    folder = Path(os.fspath(engines_dir))
    rule = parse_iterstop(iterstop)
    manifest = Manifest.load(folder)
    grid = tuple(shape) if shape is not None else manifest.size
    manifest.check_input_shape(grid)
    ckpt = reference_checkpoint(folder, checkpoint)
    env = environment()
    moving, fixed, pair_name = _prepared_pair(pair, grid, intensity)  # type: ignore[arg-type]

    specs = [EngineSpec("reference", lambda: TorchSolver(ckpt, device), baseline=True,
                        cuda=device.startswith("cuda"))]
    for name in dict.fromkeys(engines):  # keeps order, drops repeats
        specs.append(EngineSpec(
            f"{name}-{manifest.precision}",
            lambda name=name: make_solver(name, engines=folder, device=device),
            cuda=device.startswith("cuda"),
        ))
    results = measure_latency(specs, moving, fixed, rule, repeats=repeats, warmup=warmup, on_step=on_step)
    reference = next(r for r in results if r.baseline)
    payload = {
        "config": {"engines_dir": str(folder), "checkpoint": str(ckpt), "device": device, "shape": list(grid),
                   "pair": pair_name, "iterstop": rule.name, "repeats": repeats, "warmup": warmup,
                   "intensity": intensity, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
        "environment": env,
        "stage_order": list(STAGES),
        "memory_note": ("CUDA: torch.cuda.max_memory_allocated during a run (torch allocations only)."
                        if device.startswith("cuda") else
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
    from iirp.runtime.solvers import make_solver

    options = options or RegistrationOptions()
    out_path = check_output_dir(out)
    method_list = parse_methods(methods)
    pairs = read_pairs(pairs_csv, need_segs=True)
    solver = make_solver(engine or ("ort" if engines_dir is not None else "torch"), checkpoint=checkpoint,
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
                   "intensity": options.intensity,
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
