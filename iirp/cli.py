"""Command-line entry points: thin typer commands over the library API.

Every :class:`~iirp.errors.IirpError` (bad input, artefact or environment)
becomes one line on stderr and exit code 2; ``--verbose`` shows the traceback.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Callable, NoReturn, Optional, TypeVar

import typer

from iirp.errors import IirpError
from iirp.iterstop import DEFAULT_DELTA, DEFAULT_MAX_ITERS

T = TypeVar("T")

run_app = typer.Typer(add_completion=False, help="Register a moving image to a fixed image with IIRP-Net.")
export_app = typer.Typer(add_completion=False)
bench_app = typer.Typer(add_completion=False)
train_app = typer.Typer(add_completion=False)


def _fail(prog: str, err: BaseException, verbose: bool) -> NoReturn:
    if verbose:
        traceback.print_exception(err, file=sys.stderr)
    typer.echo(f"{prog}: error: {err}", err=True)
    raise typer.Exit(2)


def _guarded(prog: str, verbose: bool, call: Callable[[], T]) -> T:
    try:
        return call()
    except IirpError as err:
        _fail(prog, err, verbose)
    except KeyboardInterrupt:
        typer.echo(f"{prog}: interrupted; nothing was written", err=True)
        raise typer.Exit(130) from None


@run_app.command(
    epilog=(
        "Without --affine or --initial-transform the moving image keeps its physical position: "
        "the network assumes the pair is already affinely aligned."
    )
)
def run(
    fixed: Path = typer.Argument(..., help="Fixed image (any format SimpleITK reads)."),
    moving: Path = typer.Argument(..., help="Moving image."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (created)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="RP-Net checkpoint (.pt): PyTorch reference."),
    engines: Optional[Path] = typer.Option(None, "--engines", help="Folder written by iirp-export."),
    engine: Optional[str] = typer.Option(
        None, "--engine", help="torch | ort | trt (default: torch with --checkpoint, ort with --engines)."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    iterstop: str = typer.Option("official", "--iterstop", help="official | paper | rpnet | fixed:a,b,c,d"),
    delta: float = typer.Option(DEFAULT_DELTA, "--delta", help="IterStop NCC improvement threshold."),
    max_iters: int = typer.Option(DEFAULT_MAX_ITERS, "--max-iters", help="Maximum passes per level."),
    moving_seg: Optional[Path] = typer.Option(None, "--moving-seg", help="Moving label map to warp."),
    affine: bool = typer.Option(False, "--affine", help="Rigid-then-affine pre-alignment (SimpleITK, Mattes MI)."),
    initial_transform: Optional[Path] = typer.Option(
        None, "--initial-transform", help="ITK transform file (fixed -> moving) instead of --affine."
    ),
    intensity: str = typer.Option("minmax", "--intensity", help="minmax | percentile:LO,HI | window:LO,HI"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    verbose: bool = typer.Option(False, "--verbose", help="Show tracebacks."),
) -> None:
    """Register MOVING to FIXED; write warped image, displacement field, labels and a report."""
    from iirp.runtime import RegistrationOptions, make_solver, register_files

    if (checkpoint is None) == (engines is None):
        _fail("iirp-run", IirpError("give exactly one of --checkpoint CKPT or --engines DIR"), verbose)
    if affine and initial_transform is not None:
        _fail("iirp-run", IirpError("use either --affine or --initial-transform, not both"), verbose)
    options = RegistrationOptions(
        iterstop=iterstop, delta=delta, max_iters=max_iters, intensity=intensity,
        affine=affine, initial_transform=initial_transform,
    )

    def _go() -> dict:
        from iirp.iterstop import parse_iterstop
        from iirp.runtime.imageio import check_output_dir
        from iirp.runtime.intensity import parse_intensity

        # cheap checks first, so a typo does not wait for the model to load
        check_output_dir(out)
        parse_iterstop(iterstop, delta, max_iters)
        parse_intensity(intensity)
        chosen = engine or ("ort" if engines is not None else "torch")
        solver = make_solver(chosen, checkpoint=checkpoint, engines=engines, device=device)
        return register_files(fixed, moving, solver, out, moving_seg=moving_seg, options=options)

    report = _guarded("iirp-run", verbose, _go)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    t = report["timings_ms"]
    stages = ", ".join(f"{k} {v / 1e3:.1f}s" for k, v in t.items() if k != "total")
    typer.echo(f"iterations (levels 4..1): {report['iterations']}  estimator passes: {report['estimator_passes']}")
    typer.echo(f"folding fraction: {report['folding_fraction']:.5f}")
    typer.echo(f"time: {t['total'] / 1e3:.1f}s ({stages})")
    for name, path in report["outputs"].items():
        typer.echo(f"{name:>13}: {path}")


def _not_yet(prog: str) -> NoReturn:
    typer.echo(f"{prog}: not implemented yet", err=True)
    raise typer.Exit(2)


@export_app.command(
    epilog=(
        "Dynamic exports accept 16..256 voxels per axis (multiples of 8; widened to include --shape). "
        "fp16 files keep float32 inputs and outputs. onnxruntime's CPU provider runs fp16 files with "
        "float32 arithmetic, so --verify checks fp16 weights there, not fp16 arithmetic."
    )
)
def export(
    checkpoint: Path = typer.Argument(..., help="RP-Net checkpoint (.pt)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (created, or an earlier export replaced)."),
    shape: Optional[tuple[int, int, int]] = typer.Option(
        None, "--shape", help="Model grid D H W (array extents X Y Z, multiples of 8); default: the checkpoint's size."
    ),
    dynamic: bool = typer.Option(False, "--dynamic", help="Symbolic spatial dims (verified at --shape)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 (fp16 weights and compute)."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (17 or newer)."),
    trt: bool = typer.Option(False, "--trt", help="Also build TensorRT engines (needs tensorrt and a GPU)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare every stage with PyTorch (onnxruntime)."),
    verify_pair: Optional[tuple[Path, Path]] = typer.Option(
        None, "--verify-pair", help="FIXED MOVING images to verify with as well."
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Show tracebacks."),
) -> None:
    """Export CHECKPOINT to ONNX stages (and TensorRT engines) with a manifest, in folder OUT."""
    from iirp.manifest import Manifest

    def _go() -> Manifest:
        from iirp.export import export_checkpoint

        return export_checkpoint(
            checkpoint, out, shape=shape if shape and None not in shape else None, dynamic=dynamic,
            precision=precision, opset=opset, trt=trt, verify=verify,
            verify_pair=verify_pair if verify_pair and None not in verify_pair else None, progress=True,
        )

    manifest = _guarded("iirp-export", verbose, _go)
    grid = "dynamic" if manifest.dynamic else "x".join(str(s) for s in manifest.size)
    engines = ", TensorRT engines" if manifest.tensorrt else ""
    typer.echo(f"wrote {out}: {len(manifest.stages)} stages, {manifest.precision}, {grid}, opset {manifest.opset}"
               f" ({manifest.exporter.get('method', '?')} exporter){engines}")


@bench_app.command()
def bench() -> None:
    """Latency and accuracy reports (not implemented yet)."""
    _not_yet("iirp-bench")


@train_app.command()
def train() -> None:
    """Train RP-Net (not implemented yet)."""
    _not_yet("iirp-train")
